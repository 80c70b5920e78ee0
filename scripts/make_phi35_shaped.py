"""Write a random-init Phi-3.5-mini-shaped checkpoint (stock `Phi3ForCausalLM`, bf16) with the real Phi-3.5
tokenizer, for GPU runs of the recipes where the Hub cannot be reached. Shape flags shrink it for smoke tests.

    python scripts/make_phi35_shaped.py --tokenizer ../shared/fixtures/phi35-tokenizer --out /tmp/phi35-shaped
"""

import argparse

import torch
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder of the Phi-3.5 tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = Phi3Config(vocab_size=32064, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        max_position_embeddings=4096, original_max_position_embeddings=4096, pad_token_id=32000,
                        bos_token_id=1, eos_token_id=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {args.out}")


if __name__ == "__main__":
    main()
