"""Prompt-to-Prompt (Hertz et al., ICLR 2023) on from-scratch latent diffusion networks.

    core/    the editing engine: pipeline (sampling), controller (contract), sites, store, align,
             attention_edit, local_blend, settings, run, attention_maps, inversion
    files/   model files and images: loading, convert, download, images (photos in), output (images out)
    world/   the embedded model's toy world: scenes, judge, train, evaluate
    experiments/ many edits: experiment files, packed batches (run_edits), torchrun shards
    cli/     the `p2p` command
The names most code needs are importable from here.
"""
from p2p.core.controller import Compose, Controller, GuidanceLayout
from p2p.core.pipeline import Pipeline
from p2p.core.run import EditResult, run_edit, save_edit, sweep
from p2p.core.settings import EditSettings
from p2p.core.sites import SiteSelection
from p2p.core.store import AttentionStore
from p2p.experiments.batch import run_edits

__all__ = ["AttentionStore", "Compose", "Controller", "EditResult", "EditSettings", "GuidanceLayout", "Pipeline",
           "SiteSelection", "run_edit", "run_edits", "save_edit", "sweep"]
