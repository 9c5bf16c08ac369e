"""The ``molrg`` command line: one sub-command per experiment of the papers.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``molrg --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("molrg_ext.experiments.demo", "train a subspace denoiser on MoLRG data (quick)"),
    "phase-transition": (
        "molrg_ext.experiments.phase_transition",
        "Fig. 4 / Fig. 8: success rate of SVD, K-subspaces and SGD vs (N_k, d)",
    ),
    "rank-vs-snr": (
        "molrg_ext.experiments.rank_vs_snr",
        "Fig. 3(b) / 7(a): Jacobian rank of denoisers along EDM sampling trajectories",
    ),
    "gl-score": ("molrg_ext.experiments.gl_score", "Fig. 5(a): GL score vs N_k / d_k"),
    "edit": ("molrg_ext.experiments.edit", "Section 4.2: edit x_t along Jacobian singular vectors"),
    "hidden-gaussian": (
        "molrg_ext.experiments.hidden_gaussian",
        "seed 003: distances to Gaussian / optimal / posterior-mean denoisers, linearity",
    ),
    "bench": ("molrg_ext.experiments.bench", "benchmark the fused ops against PyTorch peers"),
}

# the bounds of the option types in experiments/_common.py, which refuse larger values
_BOUNDS = ("Integer sizes and counts are at most 2**31 - 1, seeds in [0, 2**32 - 1], --threads "
           "at most 4096; --out must not exist as a file (for bench: as a folder).")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Options show their default in --help, except defaults of None or False (no value)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molrg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


# the commands that keep finished work (cells, runs, checkpoints) and reuse it on a rerun
_RESUMABLE = ("phase-transition", "rank-vs-snr", "gl-score", "edit", "hidden-gaussian")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"molrg {name}", description=COMMANDS[name][1],
                                  formatter_class=_DefaultsHelp, epilog=_BOUNDS)
    module.add_arguments(sub)
    for action in sub._actions:  # options without a help text still show their default
        if (not action.help and action.option_strings and action.default is not None
                and action.default is not False and action.default != argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        # finished work is on disk (written atomically); a rerun picks it up
        if os.environ.get("MOLRG_TRACEBACK"):
            raise
        resume = ("; run the same command again to resume from the work already saved"
                  if name in _RESUMABLE else "")
        print(f"\nmolrg {name}: interrupted{resume}", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        # settings the library refuses (e.g. --K 2 --d 30 with n = 48) are usage errors: one
        # line and exit status 2, as argparse reports its own; MOLRG_TRACEBACK=1 re-raises
        if os.environ.get("MOLRG_TRACEBACK"):
            raise
        sub.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
