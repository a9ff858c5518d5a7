"""Architecture presets by name: plain data, so the config can check a name without loading a model."""

from __future__ import annotations

# Encoder presets: (embed_dim, depth, num_heads, patch_size). Decoder default 512-d, 8 blocks.
ARCHS: dict[str, dict] = {
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_huge_patch14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    # Small-image presets (28-64 px inputs such as Fashion-MNIST or CIFAR).
    "vit_tiny_small_images": dict(
        embed_dim=192, depth=6, num_heads=3, patch_size=4,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    "vit_small_small_images": dict(
        embed_dim=384, depth=8, num_heads=6, patch_size=4,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
}
