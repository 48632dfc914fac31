"""kd-plugin: knowledge distillation for fairseq (loaded with ``fairseq-train --user-dir kd_plugin``).

fairseq is deliberately NOT in install_requires: every fairseq release declares torchaudio, which drags
another torch build. Install fairseq==0.12.2 with ``--no-deps`` first (``make setup`` does it; see README).
"""
from setuptools import find_packages, setup

setup(
    name="kd-plugin",
    version="0.1.0",
    description="Token-level, sentence-level and gated hybrid knowledge distillation for fairseq",
    packages=find_packages(include=["kd_plugin", "kd_plugin.*"]),
    # kd-advise's evidence (written by examples/study_advise.py and examples/plateau.py)
    package_data={"kd_plugin": ["advise_rule.json", "plateau_answer.json"]},
    python_requires=">=3.8",
    install_requires=[
        "numpy",
        "sacrebleu>=2.0",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "bitarray",
        "regex",
    ],
    extras_require={
        # kd-export (CTranslate2 models); the version the tests run with
        "export": ["ctranslate2==4.8.5"],
    },
    entry_points={
        "console_scripts": [
            "kd-distill-corpus=kd_plugin.cli.distill_corpus:cli_main",
            "kd-dump-teacher=kd_plugin.cli.dump_teacher:cli_main",
            "kd-gate-dump=kd_plugin.cli.gate_dump:cli_main",
            "kd-export=kd_plugin.cli.export:cli_main",
            "kd-advise=kd_plugin.cli.advise:cli_main",
            "kd-flags=kd_plugin.cli.list_flags:cli_main",
        ]
    },
)
