"""The built-in methods, one registration each, with the paper each implements.

Static presets carry the published (or reference-code) defaults documented in
:mod:`adamerge.rewrite.presets`; learned methods the defaults in :mod:`adamerge.methods.learned`.
"""

from __future__ import annotations

from adamerge.methods.calibrated_method import CalibratedMethod
from adamerge.methods.concrete import CONCRETE, ConcreteMaskedMethod
from adamerge.methods.expert_merging import ChunkRefinedMethod
from adamerge.methods.frank_wolfe import FW_MERGING, FrankWolfeMethod
from adamerge.methods.learned import LearnedMethod
from adamerge.methods.registry import register_method
from adamerge.methods.rewrite_method import RewriteMethod
from adamerge.methods.routed import TWIN_MERGING, WEMOE, TwinMergingMethod, WeightEnsemblingMethod
from adamerge.methods.static_method import StaticMethod
from adamerge.rewrite.presets import STATIC_PRESETS as P

ADAMERGING = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024"
ATLAS = "Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling, NeurIPS 2024"
EXPERT_MERGING = "Zhang et al., Expert Merging: Model Merging with Unsupervised Expert Alignment and Importance-Guided Layer Chunking, 2025"
EXPERT = {"constraint": "sigmoid", "init": 0.1, "objective": "expert-alignment", "optimizer": "adamw", "lr": 0.5,
          "weight_decay": 1e-5, "scheduler": "cosine-restarts", "paper": EXPERT_MERGING}  # fmt: skip

register_method(StaticMethod("average", "Wortsman et al., Model soups, ICML 2022", P["average"]))
register_method(StaticMethod("task-arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023", P["task-arithmetic"]))
register_method(StaticMethod("ties", "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023", P["ties"]))
register_method(StaticMethod("dare", "Yu et al., Language Models are Super Mario (DARE), ICML 2024", P["dare"]))
register_method(StaticMethod("breadcrumbs", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024", P["breadcrumbs"]))
register_method(
    StaticMethod(
        "consensus", "Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024", P["consensus"]
    )
)
register_method(
    StaticMethod(
        "lines", "Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, ICLR 2025", P["lines"]
    )
)
register_method(
    RewriteMethod(
        "pcb", "Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024", rewrite_class="adamerge.rewrite.pcb:PCBMerge"
    )
)
register_method(
    RewriteMethod(
        "tsv-m",
        "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
        rewrite_class="adamerge.rewrite.tsv:TSVMerge",
    )
)
register_method(
    RewriteMethod(
        "iso-c",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025",
        rewrite_class="adamerge.rewrite.isotropic:IsoCMerge",
    )
)
register_method(
    RewriteMethod(
        "iso-cts",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025",
        rewrite_class="adamerge.rewrite.isotropic:IsoCTSMerge",
    )
)
register_method(
    CalibratedMethod(
        "fisher",
        "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
        rewrite_class="adamerge.rewrite.fisher:FisherMerge",
    )
)
register_method(
    CalibratedMethod(
        "regmean",
        "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
        rewrite_class="adamerge.rewrite.regmean:RegMeanMerge",
    )
)
register_method(LearnedMethod("adamerging", ADAMERGING))
register_method(LearnedMethod("adamerging++", ADAMERGING, trim_density=0.2))
register_method(
    LearnedMethod("atlas", ATLAS, constraint="none", optimizer="adamw", objective="pseudo-label", weight_decay=0.1, few_shot=True)
)
register_method(LearnedMethod("expert-merging", **EXPERT))
register_method(ChunkRefinedMethod("expert-merging++", **EXPERT, stage_one="expert-merging"))
register_method(ConcreteMaskedMethod("concrete-adamerging", CONCRETE))
register_method(FrankWolfeMethod("fw-merging", FW_MERGING))
register_method(WeightEnsemblingMethod("wemoe", WEMOE))
register_method(TwinMergingMethod("twin-merging", TWIN_MERGING))
