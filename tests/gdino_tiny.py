"""Build a tiny randomly initialised Grounding DINO folder (same format as a real `save_pretrained` download).

Used by the tests and the detect benchmark: it loads through AutoProcessor / AutoModelForZeroShotObjectDetection
exactly like `IDEA-Research/grounding-dino-tiny`, with no network. Outputs are random (tests check wiring, shapes,
ranges and errors, never accuracy). Recipe and traps: the project's Grounding DINO reference notes.

    python tests/gdino_tiny.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

# Hand-written BERT vocabulary: the model hard-codes [CLS]=101, [SEP]=102, "."=1012, "?"=1029.
_WORDS = ["main", "object", "key", "logo", "clothes", "bag", "car", "building", "red", "blue", "green", "jacket",
          "shoe", "person", "dog", "cat", "tree", "house", "bottle", "cup", "phone", "watch", "hat", "shirt", "box",
          "sign", "window", "door", "wheel", "face", "hand"]
VOCAB_SIZE = 1100


def _vocab() -> list[str]:
    vocab = [f"[unused{i}]" for i in range(VOCAB_SIZE)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[1012], vocab[1029] = ".", "?"
    free = [i for i in range(200, 1000)]
    for i, ch in zip(free, "abcdefghijklmnopqrstuvwxyz0123456789,;:!-'"):
        vocab[i] = ch
    for i, ch in zip(free[50:], "abcdefghijklmnopqrstuvwxyz0123456789"):
        vocab[i] = "##" + ch
    for i, w in zip(free[100:], _WORDS):
        vocab[i] = w
    return vocab


def build_tiny_gdino(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a ~1 MB random Grounding DINO (model + processor) to `out_dir`; returns the folder."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = out / "vocab.txt"
    vocab_path.write_text("\n".join(_vocab()) + "\n", encoding="utf-8")

    backbone = SwinConfig(image_size=128, embed_dim=8, depths=[1] * 4, num_heads=[1] * 4, window_size=4,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37)
    # decoder_layers=1 breaks weight tying; 2 is the smallest that loads.
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
                                 max_text_len=32, encoder_n_points=1, decoder_n_points=1)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(out)

    tokenizer = BertTokenizer(str(vocab_path))  # positional path: `vocab_file=` is ignored in transformers 5.x
    # Small images keep CPU tests fast; 128 is the smallest size GroupNorm accepts (64 fails).
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build_tiny_gdino(sys.argv[1]))
