"""The app's panels, one module each; every panel renders the ScreenModel and nothing else."""

from loopscope.ui.panels.base import TextPanel, fmt, shape
from loopscope.ui.panels.bug_list import BugList
from loopscope.ui.panels.code import CodePanel
from loopscope.ui.panels.epochs import EPOCHS_HEADER, EpochsPanel, epoch_line
from loopscope.ui.panels.findings import DIAGNOSTICS_KEY, BugInfo, DiagnosticsPanel, FindingLine
from loopscope.ui.panels.gradients import GradientsPanel
from loopscope.ui.panels.header import PipelineBar, StatusLine
from loopscope.ui.panels.output import OutputPanel
from loopscope.ui.panels.ranks import RanksPanel
from loopscope.ui.panels.tensors import TensorsPanel

__all__ = [
    "DIAGNOSTICS_KEY",
    "EPOCHS_HEADER",
    "BugInfo",
    "BugList",
    "CodePanel",
    "DiagnosticsPanel",
    "EpochsPanel",
    "FindingLine",
    "GradientsPanel",
    "OutputPanel",
    "PipelineBar",
    "RanksPanel",
    "StatusLine",
    "TensorsPanel",
    "TextPanel",
    "epoch_line",
    "fmt",
    "shape",
]
