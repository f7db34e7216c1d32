"""``bncli check-shape``: is this a valid BatchNorm2d input, and if not, what is the fix?"""

from __future__ import annotations

from typing import Annotated

import typer

from bncli.commands.common import handle_errors, print_json
from bncli.commands.options import (
    GlobOpt,
    InputsArg,
    JsonOpt,
    KeyOpt,
    Layout,
    LayoutOpt,
    Mode,
    ModeOpt,
    parse_channels,
)


@handle_errors
def check_shape(
    inputs: InputsArg,
    key: KeyOpt = None,
    mode: ModeOpt = Mode.train,
    layout: LayoutOpt = Layout.nchw,
    num_features: Annotated[int | None, typer.Option(
        "--num-features", "-C", callback=parse_channels,
        help="Expected channel count (e.g. your layer's num_features).")] = None,
    scan: Annotated[bool, typer.Option(
        "--scan/--no-scan", help="Scan the values: NaN/Inf, constant and ill-conditioned channels "
                            "(--no-scan reads headers only).")] = True,
    glob: GlobOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate inputs without normalizing: rank, layout, channels, dtype, batch size, values.

    Exit 0 when every input is a valid BatchNorm2d input (warnings allowed), 1
    otherwise. A folder means its files (see --glob), in natural order. Each
    finding has a stable code (not_4d, channels_last, channel_mismatch,
    one_value_per_channel, not_float, non_finite, constant_channel,
    ill_conditioned, empty, unreadable, unsafe, ambiguous_key), a severity, a
    message and a fix.

    Examples:

        bncli check-shape sample_data/*.npy

        bncli check-shape shards/ --glob 'train_*.npy' --layout nhwc

        bncli check-shape image.npy --mode eval --num-features 3 --json
    """
    from bncli.api import check_shape as check
    from bncli.io import expand_inputs

    reports = [check(p, key=key, num_features=num_features, mode=mode.value, layout=layout.value, scan=scan)
               for p in expand_inputs(inputs, glob=glob)]
    if as_json:
        print_json([r.to_dict() for r in reports])
    else:
        from bncli.render import console, findings_text

        out = console()
        for r in reports:
            out.print(findings_text(r), end="")
        bad = sum(not r.valid for r in reports)
        if len(reports) > 1:
            out.print(f"{len(reports) - bad} of {len(reports)} inputs valid.")
    if any(not r.valid for r in reports):
        raise typer.Exit(1)
