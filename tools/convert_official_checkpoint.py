#!/usr/bin/env python
"""Converts a checkpoint of the authors' mmdet code into a detectron2 checkpoint of this project.

Every tensor of the authors' ``state_dict`` is renamed to the ``PanopticSegFormer`` built from
``--config-file`` or explicitly ignored, and checked against it; otherwise the tool refuses,
naming the keys (:mod:`panoptic_segformer.d2.official_checkpoint`). The output, ``{"model": ...,
"__author__": ...}``, loads as ``MODEL.WEIGHTS``; a summary of the counts per part is printed and
written to ``<output>.json``, with the config to evaluate it with, its ``train_net.py
--eval-only`` command, and a warning for every inference setting the config sets otherwise than
the authors (:mod:`panoptic_segformer.d2.official_settings`). The input is read as data
(``torch.load`` with ``weights_only=True``); a file asking for anything else could run code,
and is refused with a ``pickle.UnpicklingError`` naming it.

Example:
  python tools/convert_official_checkpoint.py --config-file configs/r50.yaml \\
      --input panoptic_segformer_r50_2x.pth --output r50_converted.pth
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from panoptic_segformer.d2.official_checkpoint import AUTHOR, ConversionError, convert_state_dict
from panoptic_segformer.d2.official_settings import format_summary, use_with
from panoptic_segformer.modeling.backbone import read_state_dict


def build_model_for_conversion(cfg) -> nn.Module:
    """The config's meta-architecture for its state dict's names and shapes: its sub-modules are
    built on the meta device (a model of any size in a moment and without memory), the
    meta-architecture itself on the CPU (it computes its class maps from its ids); ImageNet
    weights (MODEL.TIMM.PRETRAINED) are not read."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from panoptic_segformer.d2.registration import register

    register()  # the meta-architecture and the backbone the configs name

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.TIMM.PRETRAINED = ""
    architecture = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    # torch.device as a context: factory calls of this thread only, nothing patched
    with torch.device("meta"):
        parts = architecture.from_config(cfg)
    return architecture(**parts)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint of the authors' mmdet Panoptic SegFormer "
        "(github.com/zhiqi-li/Panoptic-SegFormer) into this project's detectron2 format.",
        epilog="Refuses, naming the keys, when a tensor is left unmapped, a model entry is not "
        "filled or a shape differs. Writes OUTPUT and a summary OUTPUT.json.",
    )
    parser.add_argument(
        "--config-file", required=True, help="this project's config, e.g. configs/r50.yaml"
    )
    parser.add_argument("--input", required=True, help="the authors' checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Converts ``--input`` for ``--config-file``; returns the exit status (1 on refusal)."""
    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.registration import register

    args = parse_args(argv)
    official = read_state_dict(args.input)
    register()
    cfg = get_config(args.config_file, args.opts)
    model = build_model_for_conversion(cfg)
    try:
        state_dict, report = convert_state_dict(official, model)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.save({"model": state_dict, "__author__": AUTHOR}, args.output)
    summary = {
        "input": str(args.input),
        "config_file": str(args.config_file),
        "opts": list(args.opts),
        "output": str(args.output),
        **report.summary(),
        "use_with": use_with(cfg, str(args.output)),
    }
    Path(f"{args.output}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {args.output} and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
