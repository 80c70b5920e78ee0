"""`so8t-hf push OUTPUT_DIR --repo-id ID [--private/--public] [--dry-run STAGING_DIR]`: publish a finished
thinking-SFT run (the complete model at the repo root, the adapter in `adapter/`, model cards). Private unless
`--public`; `--dry-run` writes exactly the repo's files to STAGING_DIR and uploads nothing."""

from __future__ import annotations

import argparse


def cmd_push(args: argparse.Namespace) -> int:
    from so8t_hf.hub import push_output_dir

    card = dict(base_model=args.base_model, license=args.license, language=args.language or (),
                datasets=args.dataset or ())
    result = push_output_dir(args.output_dir, args.repo_id, private=args.private, token=args.token,
                             dry_run=args.dry_run, **card)
    if args.dry_run:
        from pathlib import Path

        files = sorted(p for p in Path(result).rglob("*") if p.is_file())
        print(f"dry run: {len(files)} files for {args.repo_id} ({'private' if args.private else 'public'}) staged "
              f"in {result}; nothing uploaded")
        for path in files:
            print(f"  {path.relative_to(result)} ({path.stat().st_size:,} bytes)")
    else:
        print(f"pushed {args.output_dir} to {args.repo_id} ({'private' if args.private else 'public'}): {result}")
    return 0


def add_subparser(subparsers) -> None:
    push = subparsers.add_parser("push", help="publish a finished run to the Hub (model at the root, adapter/, cards)")
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output_dir (holds final/ and adapter/)")
    push.add_argument("--repo-id", required=True, help="Hub repo, e.g. your-name/so8t-phi35-thinking")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    push.add_argument("--dry-run", metavar="STAGING_DIR",
                      help="write the repo's files to this new or empty folder and upload nothing")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    push.add_argument("--hub_base_model", "--hub-base-model", "--base-model", dest="base_model", metavar="ID",
                      help="Hub id of the base model, for the cards (base_model) and adapter_config.json "
                           "(base_model_name_or_path); default: the run's --hub_base_model, else its "
                           "model_name_or_path when that is a Hub id")
    push.add_argument("--license", help="card license (default: the base model's)")
    push.add_argument("--language", nargs="+", metavar="CODE", help="card languages, e.g. en ja")
    push.add_argument("--dataset", nargs="+", metavar="ID", help="Hub dataset ids of the training data, for the card")
    push.set_defaults(func=cmd_push)
