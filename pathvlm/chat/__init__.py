"""Chat that answers the question asked: a question router and the routed answers."""

from pathvlm.chat.assistant import ChatAssistant, ChatConfig, Reply, case_facts
from pathvlm.chat.router import Route, route_question

__all__ = ["ChatAssistant", "ChatConfig", "Reply", "Route", "case_facts", "route_question"]
