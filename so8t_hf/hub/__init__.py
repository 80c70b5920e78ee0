"""Publishing a thinking-SFT run: what a released checkpoint carries (`checkpoint`), the model cards (`cards`), the
repo laid out in a folder (`staging`) and the push (`push`). `so8t-hf push` and the recipe's `--push_to_hub` call
`push_output_dir`."""

from so8t_hf.hub.push import push_output_dir
from so8t_hf.hub.staging import stage_output_dir

__all__ = ["push_output_dir", "stage_output_dir"]
