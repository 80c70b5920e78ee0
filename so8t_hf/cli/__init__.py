"""`so8t-hf` command line: `env`, `train`, `chat`, `serve`, `export`, `push` (`so8t-hf COMMAND --help`)."""

from so8t_hf.cli.main import main

__all__ = ["main"]
