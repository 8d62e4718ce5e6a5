"""`python -m fused_inception`: the fusion report (see fused_inception.report, or --help)."""

import os
import sys

import torch

from fused_inception.kernels import conv as kconv
from fused_inception.report import main, parser


def _wants_interpreter(argv):
    args = parser().parse_args(argv)
    return args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not kconv.INTERPRETING and _wants_interpreter(argv):
        # The kernels were decorated when fused_inception was imported, before the arguments were
        # read: start again with the interpreter on.
        os.execve(sys.executable, [sys.executable, "-m", "fused_inception", *argv],
                  dict(os.environ, TRITON_INTERPRET="1"))
    if kconv.INTERPRETING:
        from fused_inception import interpreter

        interpreter.configure()  # (cheaper, and bf16 rounded as on a GPU: fused_inception/interpreter.py)
    main(argv)
