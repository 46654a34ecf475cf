import sys

from .run import build_parser, run

sys.exit(run(build_parser().parse_args()))
