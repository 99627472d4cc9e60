"""``mmsafe run``: every stage from one YAML config, in order, each resumable.

Stages: ``prepare`` (bundled sample data, tiny model) -> ``build-data`` -> ``teach``
(optional supervised warm-up) -> ``blind`` -> ``train`` (DPO and/or BPO) -> ``generate``
(base and trained models) -> ``judge`` -> ``report``. Every stage writes plain files under
``out/`` and, when it finishes, a marker ``out/.stages/<stage>.json`` holding a hash of
the config it ran with (its resolved stage config, chained through the stages before
it). A stage whose marker matches the current config is skipped; an interrupted stage
resumes (generation and judging are append-only streams, training continues from its
last checkpoint). A stage whose outputs were made with a different config is refused
with a clear message rather than silently mixed: use another ``out`` or ``--from STAGE``
to redo it.

- :mod:`~mmsafe.pipeline.config`: the sections of the YAML, and :func:`load_pipeline_config`,
  which checks every stage's options before any stage runs.
- :mod:`~mmsafe.pipeline.paths`: where each stage reads and writes under ``out``.
- :mod:`~mmsafe.pipeline.stages`: each stage's resolved config, and the stage that runs it.
- :mod:`~mmsafe.pipeline.runner`: :func:`run_pipeline`, the hashes, markers and the lists
  of files each stage wrote.
- :mod:`~mmsafe.pipeline.table`: :func:`safety_table`, the results as text.
"""

from __future__ import annotations

from mmsafe.pipeline.config import (
    METHODS,
    STAGES,
    TINY_MODEL,
    BlindSection,
    DataSection,
    GenerateSection,
    JudgeSection,
    PipelineConfig,
    TeachSection,
    TrainSection,
    load_pipeline_config,
)
from mmsafe.pipeline.paths import Paths
from mmsafe.pipeline.runner import (
    HASH_SCHEME,
    PARALLEL_STAGES,
    PipelineResult,
    StageOutcome,
    remove_stage_outputs,
    run_pipeline,
    stage_hashes,
    stage_status,
)
from mmsafe.pipeline.stages import (
    STAGE_CONFIGS,
    STAGE_FUNCTIONS,
    BlindStage,
    GenerateStage,
    JudgeSpec,
    JudgeStage,
    ModelGeneration,
    PrepareStage,
    RecordSet,
    ReportStage,
    base_model_path,
    blind_stage,
    build_stage,
    eval_data,
    generate_stage,
    judge_stage,
    models_to_evaluate,
    prepare_stage,
    report_stage,
    stage_blind,
    stage_build_data,
    stage_configs,
    stage_generate,
    stage_judge,
    stage_prepare,
    stage_report,
    stage_teach,
    stage_train,
    teach_stage,
    train_data,
    train_stage,
)
from mmsafe.pipeline.table import safety_table

__all__ = [
    "HASH_SCHEME",
    "METHODS",
    "PARALLEL_STAGES",
    "STAGES",
    "STAGE_CONFIGS",
    "STAGE_FUNCTIONS",
    "TINY_MODEL",
    "BlindSection",
    "BlindStage",
    "DataSection",
    "GenerateSection",
    "GenerateStage",
    "JudgeSection",
    "JudgeSpec",
    "JudgeStage",
    "ModelGeneration",
    "Paths",
    "PipelineConfig",
    "PipelineResult",
    "PrepareStage",
    "RecordSet",
    "ReportStage",
    "StageOutcome",
    "TeachSection",
    "TrainSection",
    "base_model_path",
    "blind_stage",
    "build_stage",
    "eval_data",
    "generate_stage",
    "judge_stage",
    "load_pipeline_config",
    "models_to_evaluate",
    "prepare_stage",
    "remove_stage_outputs",
    "report_stage",
    "run_pipeline",
    "safety_table",
    "stage_blind",
    "stage_build_data",
    "stage_configs",
    "stage_generate",
    "stage_hashes",
    "stage_judge",
    "stage_prepare",
    "stage_report",
    "stage_status",
    "stage_teach",
    "stage_train",
    "teach_stage",
    "train_data",
    "train_stage",
]
