"""Field tables of the three report types, transcribed from ../shared/domain/report_fields.md.

CAP Colon and Rectum Resection / Biopsy 4.2.0.1 (A1, A2), Biomarker 1.3.0.0 (A3, all ancillary)
and the proposed lymphoma schema (B). Values are kept verbatim so a pathologist recognises them.
"""

from __future__ import annotations

from pathvlm.reports.fields import Assess as A
from pathvlm.reports.fields import FieldSpec as F
from pathvlm.reports.fields import Req as R


def _v(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(";"))


_NEURO = ("Large cell neuroendocrine carcinoma", "Small cell neuroendocrine carcinoma",
          "Mixed neuroendocrine-non-neuroendocrine neoplasm")
_CRC_TYPES = _v(
    "Adenocarcinoma; Mucinous adenocarcinoma; Signet-ring cell carcinoma (poorly cohesive "
    "carcinoma); Medullary carcinoma; Serrated adenocarcinoma; Micropapillary carcinoma; "
    "Adenosquamous carcinoma; Undifferentiated carcinoma; Carcinoma with sarcomatoid component; "
    "Large cell neuroendocrine carcinoma; Small cell neuroendocrine carcinoma; Mixed "
    "neuroendocrine-non-neuroendocrine neoplasm; Other (specify); Carcinoma, type cannot be "
    "determined")
_GRADE = _v("G1 well; G2 moderately; G3 poorly; G4 undifferentiated; Other; GX cannot be assessed; "
            "Not applicable")
_SITE = _v("Cecum; Ileocecal valve; Ascending colon; Hepatic flexure; Transverse colon; Splenic "
           "flexure; Descending colon; Sigmoid colon; Rectosigmoid; Rectum; Colon, NOS; Cannot be "
           "determined")
_POLYP = _v("None identified; Tubular adenoma; Villous adenoma; Tubulovillous adenoma; Traditional "
            "serrated adenoma; Sessile serrated adenoma/sessile serrated polyp; Hamartomatous "
            "polyp; Other")
_NPC = _v("Not identified; Present; Cannot be determined")
_BUD_SCORE = _v("Low (0-4); Intermediate (5-9); High (10 or more); Cannot be determined")

TUMOR_EXTENT_RESECTION = _v(
    "No invasion (high grade dysplasia); Invades lamina propria/muscularis mucosae (intramucosal "
    "carcinoma); Invades submucosa; Invades into muscularis propria; Invades through muscularis "
    "propria into pericolorectal tissue; Invades visceral peritoneum; Directly invades or adheres "
    "to adjacent structure(s); Cannot be determined; No evidence of primary tumor")
PT_VALUES = _v("pT not assigned; pT0; pTis; pT1; pT2; pT3; pT4a; pT4b; pT4")
PN_VALUES = _v("pN not assigned; pN0; pN1a (1 node); pN1b (2-3); pN1c (deposits, no nodes); pN1; "
               "pN2a (4-6); pN2b (>=7); pN2")

_MMR = _v("Intact nuclear expression; Loss of nuclear expression; Cannot be determined")
_MUT = _v("Mutation detected; No mutation detected; Cannot be determined")

BIOMARKERS = (
    F("mlh1_ihc", "MLH1 (IHC)", "enum", _MMR, A.ANC, R.COND),
    F("pms2_ihc", "PMS2 (IHC)", "enum", _MMR, A.ANC, R.COND),
    F("msh2_ihc", "MSH2 (IHC)", "enum", _MMR, A.ANC, R.COND),
    F("msh6_ihc", "MSH6 (IHC)", "enum", _MMR, A.ANC, R.COND),
    F("mmr_status", "Mismatch repair status", "enum",
      _v("MMR-proficient; MMR-deficient; Cannot be determined"), A.ANC, R.EXT),
    F("msi_status", "Microsatellite instability", "enum",
      _v("MSS; MSI-L; MSI-H; Cannot be determined"), A.ANC, R.COND),
    F("mlh1_promoter_methylation", "MLH1 promoter methylation", "enum",
      _v("Methylated; Unmethylated; Cannot be determined"), A.ANC, R.COND),
    F("braf_v600e", "BRAF V600E", "enum",
      _v("Mutation detected (V600E); No mutation detected; Cannot be determined"), A.ANC, R.COND),
    F("kras_status", "KRAS", "enum", _MUT, A.ANC, R.COND),
    F("nras_status", "NRAS", "enum", _MUT, A.ANC, R.COND),
    F("pik3ca_status", "PIK3CA", "enum", _MUT, A.ANC, R.OPT),
    F("pten_ihc", "PTEN (IHC)", "enum", _v("Intact; Loss; Cannot be determined"), A.ANC, R.OPT),
    F("her2_ihc", "HER2 (IHC)", "enum", _v("0; 1+; 2+; 3+; Cannot be determined"), A.ANC, R.COND),
    F("her2_ish", "HER2 (ISH)", "enum",
      _v("Amplified; Not amplified; Equivocal; Cannot be determined"), A.ANC, R.COND),
    F("tumor_cell_percent", "Tumour cell percentage", "number", (), A.HE, R.OPT, unit="%"),
)

COLORECTAL_RESECTION = (
    F("procedure", "Procedure", "enum", _v(
        "Right hemicolectomy; Transverse colectomy; Left hemicolectomy; Sigmoidectomy; Low "
        "anterior resection; Total abdominal colectomy; Abdominoperineal resection; Transanal "
        "disk excision (local excision); Endoscopic mucosal resection; Other (specify); Not "
        "specified"), A.GC),
    F("mesorectum_macroscopic_evaluation", "Macroscopic evaluation of mesorectum", "enum",
      _v("Complete; Near complete; Incomplete; Cannot be determined; Not applicable"), A.GC,
      R.COND, "rectal tumours"),
    F("tumor_site", "Tumour site", "multi_enum", _SITE, A.GC),
    F("histologic_type", "Histologic type", "enum", _CRC_TYPES, A.HE,
      image_values=tuple(v for v in _CRC_TYPES if v not in _NEURO)),
    F("histologic_grade", "Histologic grade", "enum", _GRADE, A.HE),
    F("tumor_size_cm", "Tumour size (greatest dimension)", "number", (), A.GC, unit="cm"),
    F("tumor_extent", "Tumour extent", "enum", TUMOR_EXTENT_RESECTION, A.HE_CTX),
    F("macroscopic_tumor_perforation", "Macroscopic tumour perforation", "enum", _NPC, A.GC),
    F("lymphovascular_invasion", "Lymphovascular invasion", "multi_enum", _v(
        "Not identified; Small vessel; Large vessel (venous), intramural; Large vessel (venous), "
        "extramural; Present (NOS); Cannot be determined"), A.HE),
    F("perineural_invasion", "Perineural invasion", "enum", _NPC, A.HE),
    F("tumor_bud_count", "Tumour buds (0.785 mm2 hotspot)", "integer", (), A.HE, R.OPT),
    F("tumor_bud_score", "Tumour budding score", "enum", _BUD_SCORE, A.HE, R.OPT),
    F("precursor_polyp_type", "Type of polyp in which invasive carcinoma arose", "enum", _POLYP,
      A.HE, R.OPT),
    # H&E grades the response, but only once the clinical record says therapy was given
    F("treatment_effect", "Treatment effect", "enum", _v(
        "No known presurgical therapy; Complete response (score 0); Near complete (score 1); "
        "Partial (score 2); Present (NOS); Poor or no response (score 3); Cannot be determined"),
      A.GC),
    F("margin_status_invasive", "Margin status for invasive carcinoma", "enum", _v(
        "All margins negative for invasive carcinoma; Invasive carcinoma present at margin; "
        "Other; Cannot be determined; Not applicable"), A.HE_CTX),
    F("margins_involved_invasive", "Margin(s) involved by invasive carcinoma", "multi_enum", _v(
        "Proximal; Distal; Radial (circumferential) or mesenteric; Deep; Mucosal; Other; Cannot "
        "be determined"), A.HE_CTX, R.COND, "a margin is involved"),
    F("distance_to_radial_margin", "Distance from invasive carcinoma to radial margin", "number",
      (), A.HE_CTX, R.COND, "rectal tumours", unit="mm"),
    F("margin_status_noninvasive", "Margin status for dysplasia", "multi_enum", _v(
        "All margins negative for HGD/intramucosal carcinoma and LGD; HGD/intramucosal carcinoma "
        "present at margin; LGD present at margin; Other; Cannot be determined; Not applicable"),
      A.HE_CTX),
    F("regional_lymph_node_status", "Regional lymph node status", "enum", _v(
        "Not applicable; All regional lymph nodes negative for tumor; Tumor present in regional "
        "lymph node(s); Other; Cannot be determined"), A.HE_CTX),
    F("lymph_nodes_positive_count", "Number of lymph nodes with tumour", "integer", (), A.HE_CTX,
      R.COND, "nodes were examined"),
    F("lymph_nodes_examined_count", "Number of lymph nodes examined", "integer", (), A.GC),
    F("tumor_deposits", "Tumour deposits", "enum", _NPC, A.HE),
    F("tumor_deposits_count", "Number of tumour deposits", "integer", (), A.HE, R.COND,
      "tumour deposits present"),
    F("distant_sites_involved", "Distant site(s) involved", "multi_enum", _v(
        "Not applicable; Non-regional lymph node(s); Liver; Other; Cannot be determined"), A.GC,
      R.COND, "distant metastasis known"),
    F("tnm_descriptors", "TNM descriptors", "multi_enum", _v(
        "Not applicable; m (multiple primaries); r (recurrent); y (post-treatment)"), A.GC, R.COND),
    F("pT", "Primary tumour (pT), AJCC 8th", "enum", PT_VALUES, A.DER),
    F("pN", "Regional lymph nodes (pN), AJCC 8th", "enum", PN_VALUES, A.DER),
    F("pM", "Distant metastasis (pM)", "enum", _v("Not applicable; pM1a; pM1b; pM1c; pM1"), A.GC,
      R.COND),
    F("additional_findings", "Additional findings", "multi_enum", _v(
        "None identified; Adenoma(s); Ulcerative colitis; Crohn disease; Diverticulosis; "
        "Dysplasia arising in IBD; Other"), A.HE, R.OPT),
    *BIOMARKERS,
)

COLORECTAL_BIOPSY = (
    F("specimen_integrity", "Specimen integrity", "enum", _v("Intact; Fragmented"), A.GC, R.OPT),
    F("tumor_site", "Tumour site", "multi_enum", _SITE, A.GC),
    F("histologic_type", "Histologic type", "enum", _CRC_TYPES + ("Adenoma-like adenocarcinoma",),
      A.HE, image_values=tuple(v for v in _CRC_TYPES if v not in _NEURO)
      + ("Adenoma-like adenocarcinoma",)),
    F("histologic_grade", "Histologic grade", "enum", _GRADE, A.HE),
    # forceps biopsies report depth only as "at least"; the value means "at least this deep"
    F("tumor_extent", "Tumour extent (at least)", "enum", _v(
        "Invades lamina propria; Invades muscularis mucosae; Invades submucosa; Invades "
        "muscularis propria; Cannot be determined"), A.HE_CTX),
    F("lymphovascular_invasion", "Lymphovascular invasion", "multi_enum", _v(
        "Not identified; Small vessel; Large vessel (venous); Present (NOS); Cannot be "
        "determined"), A.HE),
    F("tumor_bud_count", "Tumour buds (0.785 mm2 hotspot)", "integer", (), A.HE, R.OPT),
    F("tumor_bud_score", "Tumour budding score", "enum", _BUD_SCORE, A.HE, R.OPT),
    F("precursor_polyp_type", "Type of polyp", "enum", _POLYP, A.HE, R.OPT),
    F("polyp_size_cm", "Polyp size", "number", (), A.GC, R.OPT, unit="cm"),
    F("polyp_configuration", "Polyp configuration", "enum", _v("Pedunculated; Sessile; Other"),
      A.GC, R.OPT),
    F("margin_status_invasive", "Margin status for invasive carcinoma", "enum", _v(
        "Negative for invasive carcinoma; Deep (stalk); Mucosal; Other; Cannot be determined; "
        "Not applicable"), A.HE_CTX),
    F("margin_status_noninvasive", "Margin status for adenoma", "enum", _v(
        "All margins negative for adenoma; Adenoma present at mucosal margin; Other; Cannot be "
        "determined; Not applicable"), A.HE_CTX),
    *BIOMARKERS,
)

# lymphoma entities of the differential (WHO-HAEM5 names) and the tests that confirm each
ENTITY_PANELS: dict[str, tuple[str, ...]] = {
    "Chronic lymphocytic leukaemia/small lymphocytic lymphoma": ("CD5", "CD23", "LEF1", "CD20"),
    "Follicular lymphoma": ("CD10", "BCL6", "BCL2", "t(14;18)"),
    "Mantle cell lymphoma": ("cyclin D1", "SOX11", "CD5", "t(11;14)"),
    "Marginal zone lymphoma": ("CD20", "CD5 negative", "CD10 negative", "cyclin D1 negative"),
    "Diffuse large B-cell lymphoma, NOS": ("CD20", "PAX5", "CD10", "BCL6", "MUM1", "Ki-67",
                                            "MYC/BCL2/BCL6 FISH"),
    "Burkitt lymphoma": ("CD10", "BCL6", "BCL2 negative", "Ki-67", "MYC rearrangement"),
    "Classic Hodgkin lymphoma": ("CD30", "CD15", "PAX5 weak", "CD45 negative", "EBER"),
    "Nodular lymphocyte predominant B-cell lymphoma": ("CD20", "OCT2", "BOB1", "CD30 negative"),
    "Peripheral T-cell lymphoma, NOS": ("CD3", "CD4", "CD8", "CD30", "TCR clonality"),
    "Anaplastic large cell lymphoma": ("CD30", "ALK", "CD3"),
    "Reactive lymphoid hyperplasia": ("CD20", "CD3", "BCL2 negative in follicles", "Ki-67",
                                      "kappa/lambda", "flow cytometry"),
}
# short names a zero-shot classifier or dataset may use -> entity
ENTITY_ALIASES = {
    "CLL": "Chronic lymphocytic leukaemia/small lymphocytic lymphoma",
    "CLL/SLL": "Chronic lymphocytic leukaemia/small lymphocytic lymphoma",
    "FL": "Follicular lymphoma", "MCL": "Mantle cell lymphoma", "MZL": "Marginal zone lymphoma",
    "DLBCL": "Diffuse large B-cell lymphoma, NOS", "BL": "Burkitt lymphoma",
    "cHL": "Classic Hodgkin lymphoma", "CHL": "Classic Hodgkin lymphoma",
    "NLPHL": "Nodular lymphocyte predominant B-cell lymphoma",
    "PTCL": "Peripheral T-cell lymphoma, NOS", "ALCL": "Anaplastic large cell lymphoma",
    "reactive": "Reactive lymphoid hyperplasia",
}
WHO_VALUES = tuple(e for e in ENTITY_PANELS if e != "Reactive lymphoid hyperplasia") + (
    "Lymphoma, subtype cannot be determined", "Other")
_STUDY = _v("Performed; Not performed; Pending")
_REARR = _v("Rearranged; Not rearranged; Not performed")

LYMPHOMA = (
    F("specimen_type", "Specimen", "enum", _v("Lymph node(s); Other tissue/organ; Not specified"),
      A.GC),
    F("procedure", "Procedure", "enum", _v("Excisional biopsy; Incisional biopsy; Core needle "
                                           "biopsy; Resection; Other; Not specified"), A.GC),
    F("tumor_site", "Tumour site", "string", (), A.GC),
    F("specimen_adequacy", "Specimen adequacy", "enum", _v(
        "Adequate; Limited (small core / crush / necrosis); Inadequate"), A.HE, R.EXT),
    F("architecture_effacement", "Architecture", "enum",
      _v("Effaced; Partially effaced; Preserved; Cannot be determined"), A.HE, R.EXT),
    F("growth_pattern", "Growth pattern", "multi_enum", _v(
        "Follicular/nodular; Diffuse; Nodular and diffuse; Interfollicular/paracortical; "
        "Mantle-zone; Marginal-zone; Sinusoidal; Cannot be determined"), A.HE, R.EXT),
    F("predominant_cell_size", "Predominant cell size", "enum", _v("Small; Medium; Large; Mixed"),
      A.HE, R.EXT),
    F("cytologic_features", "Cytologic features", "multi_enum", _v(
        "Centrocytes; Centroblasts; Immunoblasts; Prolymphocytes/paraimmunoblasts; "
        "Hodgkin/Reed-Sternberg cells; Lacunar cells; LP (popcorn) cells; Plasmacytoid cells; "
        "Starry-sky macrophages; Epithelioid histiocytes; Eosinophil-rich background"), A.HE,
      R.OPT),
    F("proliferation_centers", "Proliferation centres", "enum",
      _v("Present; Absent; Cannot be determined"), A.HE, R.COND, "small B-cell lymphoma"),
    F("sclerosis", "Sclerosis", "enum", _v("Present; Absent"), A.HE, R.OPT),
    F("necrosis", "Necrosis", "enum", _v("Present; Absent"), A.HE, R.OPT),
    F("mitotic_activity", "Mitotic activity", "enum", _v("Low; Moderate; High"), A.HE, R.OPT),
    F("lineage", "Lineage", "enum", _v(
        "B-cell; T/NK-cell; Hodgkin (classic); Hodgkin (NLP); Indeterminate"), A.ANC),
    F("who_haem5_diagnosis", "WHO-HAEM5 diagnosis", "enum", WHO_VALUES, A.ANC),
    F("immunophenotyping", "Immunophenotyping (IHC)", "enum", _STUDY, A.ANC),
    F("flow_cytometry", "Flow cytometry", "enum", _STUDY, A.ANC),
    F("molecular_genetic_studies", "Molecular genetic studies", "enum", _STUDY, A.ANC),
    F("cytogenetics_fish", "Cytogenetics / FISH", "enum", _STUDY, A.ANC),
    F("ebv_eber_ish", "EBV (EBER ISH)", "enum", _v("Positive; Negative; Not performed"), A.ANC,
      R.COND),
    F("ki67_percent", "Ki-67 proliferation index", "number", (), A.ANC, R.COND, unit="%"),
    # graded on H&E, but only once ancillary results have established the entity
    F("fl_grade", "Follicular lymphoma grade", "enum", _v("1-2; 3A; 3B"), A.HE, R.COND,
      "follicular lymphoma established"),
    F("chl_subtype", "Classic Hodgkin lymphoma subtype", "enum", _v(
        "Nodular sclerosis; Mixed cellularity; Lymphocyte-rich; Lymphocyte-depleted; Cannot be "
        "determined"), A.HE, R.COND, "classic Hodgkin lymphoma established"),
    F("dlbcl_cell_of_origin", "DLBCL cell of origin", "enum",
      _v("GCB; non-GCB/ABC; Cannot be determined"), A.ANC, R.COND, "DLBCL"),
    F("myc_rearrangement", "MYC rearrangement", "enum", _REARR, A.ANC, R.COND),
    F("bcl2_rearrangement", "BCL2 rearrangement", "enum", _REARR, A.ANC, R.COND),
    F("bcl6_rearrangement", "BCL6 rearrangement", "enum", _REARR, A.ANC, R.COND),
    F("lugano_stage", "Lugano stage", "enum", _v("I; II; III; IV"), A.GC, R.OPT),
    F("prognostic_indices", "Prognostic indices (IPI, FLIPI, IPS)", "string", (), A.GC, R.OPT),
)
# fields the image may fill only after the named entity is established
ENTITY_GATED = {
    "fl_grade": "Follicular lymphoma",
    "chl_subtype": "Classic Hodgkin lymphoma",
}
