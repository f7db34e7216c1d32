"""``bncli inspect``: audit every BatchNorm layer of a checkpoint or exported model, with coded findings."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from bncli.commands.common import handle_errors, print_error, print_json
from bncli.commands.options import JsonOpt, check_momentum, parse_eps, parse_glob_option, parse_momentum

#: What a folder given to ``inspect`` contributes by default: checkpoints and exported models.
CHECKPOINT_GLOB = "*.pt,*.pth,*.ckpt,*.safetensors,*.pt2"


class FailOn(str, Enum):
    """Which findings make the exit code 1."""

    error = "error"
    warning = "warning"


def _eps(value: float | None) -> float | None:
    return None if value is None else parse_eps(value)


@handle_errors
def inspect(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .pt/.pth, Lightning .ckpt, .safetensors (a state_dict, a nested "
             "{'model': ...}/{'state_dict': ...}, module./_orig_mod. prefixes); exported "
             "models: .pt2 (torch.export.save), read without running their code. A folder "
             "means the checkpoints directly inside it (see --glob).",
        show_default=False, metavar="MODEL...", readable=False)],
    prefix: Annotated[str | None, typer.Option(
        "--prefix", metavar="NAME",
        help="Audit only this layer, named as in compare/normalize (features.1 finds "
             "state_dict.model.features.1); in a .pt2, a module path or node name.")] = None,
    eps: Annotated[float | None, typer.Option(
        "--eps", callback=_eps, show_default="1e-5, assumed",
        help="The layers' eps (a state_dict does not store it); var_below_eps compares "
             "running_var with it. A .pt2 uses each BN node's own.")] = None,
    momentum: Annotated[str | None, typer.Option(
        "--momentum", metavar="FLOAT|none", show_default="0.1, assumed", callback=check_momentum,
        help="The layers' momentum (not stored either; 'none' = cumulative average); "
             "unconverged uses it. A .pt2 uses each BN node's own.")] = None,
    fail_on: Annotated[FailOn, typer.Option(
        "--fail-on", help="Exit 1 on an error finding (default), or on any warning too (for CI).")
    ] = FailOn.error,
    glob: Annotated[str | None, typer.Option(
        "--glob", metavar="PATTERNS", callback=parse_glob_option, show_default=CHECKPOINT_GLOB,
        help="Files to take from a folder: comma-separated patterns, e.g. 'epoch_*.ckpt'. "
             "Sub-folders are not searched; files named directly are always taken.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit every BatchNorm layer of MODEL: running stats, weights, counters.

    MODEL is a checkpoint or a whole exported model (.pt2). One row per layer:
    C, num_batches_tracked, running_mean/var, weight, bias (for a .pt2 also the
    conv feeding it). Then each finding: its code, the channels it concerns,
    and the fix. A .pt2 knows each layer's eps and momentum (its graph stores
    them) and says when it was exported in train mode.

    Errors: shape_mismatch, non_finite_stats, negative_var, var_below_eps,
    never_updated. Warnings: dead_channel, unconverged (never_updated too when
    only num_batches_tracked is 0). Exit 1 on an error (with --fail-on warning,
    on any finding), else 0. Files load without pickle.

    Examples:

        bncli inspect model.pt

        bncli inspect lightning.ckpt --prefix features.1 --json

        bncli inspect model.pt2

        bncli inspect ckpts/*.pt --eps 1e-3 --momentum 0.01 --fail-on warning

        bncli inspect runs/ --glob 'epoch_*.ckpt' --json
    """
    from bncli import api
    from bncli.io.inputs import expand_inputs

    checkpoints = expand_inputs(checkpoints, glob=glob or CHECKPOINT_GLOB)

    m = api.ASSUMED if momentum is None else parse_momentum(momentum)
    if (eps is not None or momentum is not None) and any(p.suffix.lower() == ".pt2" for p in checkpoints):
        from bncli.render import console

        console(stderr=True).print("[yellow]Note:[/] --eps/--momentum apply to checkpoints; a .pt2 "
                                   "is audited with each BN node's own eps and momentum.")
    reports = [api.inspect(p, prefix=prefix, eps=eps, momentum=m) for p in checkpoints]
    failed = [r for r in reports if r.fails(fail_on.value)]
    if as_json:
        print_json([r.to_dict(fail_on.value) for r in reports])
    else:
        from bncli.render import console
        from bncli.render_audit import audit_text

        out = console()
        for r in reports:
            if r.error is not None:
                print_error(r.error, r.hint)
                continue
            for part in audit_text(r, out.width):
                out.print(part)
        if len(reports) > 1:
            out.print(f"{len(reports) - len(failed)} of {len(reports)} files pass "
                      f"(--fail-on {fail_on.value}).")
    if failed:
        raise typer.Exit(1)
