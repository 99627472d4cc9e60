"""The ``mmsafe`` command line (:func:`main`); each command group lives in its own module:
``answering`` (generate, blind, probe), ``evaluation`` (judge, report, pairwise,
benchmarks), ``workflows`` (build-data, train, run, demo), ``utilities`` (data, models,
env); ``arguments`` makes a command's flags from its typed config."""

from mmsafe.cli.main import build_parser, interrupt_message, main, resume_command
from mmsafe.cli.utilities import environment_report
from mmsafe.cli.workflows import build_data_config

__all__ = ["build_data_config", "build_parser", "environment_report", "interrupt_message", "main", "resume_command"]
