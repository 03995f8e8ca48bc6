"""Precomputed SAM embeddings: equal to a fresh encoder pass, tied to the encoder, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbones.sam import load_sam
from model.heads.sam_decoder import SamMaskHead
from prepare_datasets.prepare_sam_embeddings import SamEmbeddingsConfig, main
from utils.data.images import load_rgb_image, preprocess_for_dinov2
from utils.embedding_store import (
    EmbeddingStore,
    EmbeddingStoreWriter,
    content_key,
    encoder_fingerprint,
)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.jpg", (40, 60)), ("nested/b.png", (64, 32))):
        path = folder / name
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    copy = folder / "copy_of_a.jpg"  # the same bytes: one stored embedding
    copy.write_bytes(paths[0].read_bytes())
    return folder, [*paths, copy]


def _fresh(head: SamMaskHead, paths) -> torch.Tensor:
    pixels = [preprocess_for_dinov2(load_rgb_image(p), head.image_size)[0] for p in paths]
    return head.embed_images(torch.stack(pixels))


def _config(tiny_checkpoints, folder, out, **overrides):
    return SamEmbeddingsConfig(
        sam_checkpoint=str(tiny_checkpoints.sam), image_dirs=str(folder), out=str(out),
        device="cpu", batch_size=2, **overrides,
    )  # fmt: skip


def test_store_equals_fresh_pass_and_serves_the_head(tiny_checkpoints, images, tmp_path):
    folder, paths = images
    out = main(_config(tiny_checkpoints, folder, tmp_path / "emb.h5", dtype="float32"))
    head = SamMaskHead(load_sam(tiny_checkpoints.sam), store=out)
    store = head.cache.store
    assert len(store) == 2  # three files, two distinct contents
    fresh = _fresh(head, paths)
    for path, expected in zip(paths, fresh):
        assert torch.equal(store.get(content_key(path)), expected)
    pixels = torch.stack([preprocess_for_dinov2(load_rgb_image(p), 256)[0] for p in paths])
    head.image_encoder.forward = None  # the encoder must not run: every image is stored
    served = head.embed_images(pixels, [str(p) for p in paths])
    assert torch.equal(served, fresh)
    assert head.cache.store_hits == 3
    assert head.cache.misses == 0
    assert (tmp_path / "emb_config.json").is_file()


def test_half_precision_store_is_close(tiny_checkpoints, images, tmp_path):
    folder, paths = images
    out = main(_config(tiny_checkpoints, folder, tmp_path / "emb16.h5"))
    head = SamMaskHead(load_sam(tiny_checkpoints.sam))
    stored = EmbeddingStore(out).get(content_key(paths[1]))
    torch.testing.assert_close(stored, _fresh(head, paths[1:2])[0], atol=2e-3, rtol=2e-3)


def test_store_of_another_encoder_is_refused(tiny_checkpoints, images, tmp_path):
    folder, _ = images
    out = main(_config(tiny_checkpoints, folder, tmp_path / "emb.h5"))
    sam = load_sam(tiny_checkpoints.sam)
    with torch.no_grad():
        next(sam.image_encoder.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="made by another SAM encoder"):
        SamMaskHead(sam, store=out)


def test_interrupted_run_resumes_and_only_then_appears(tiny_checkpoints, images, tmp_path):
    folder, paths = images
    out = tmp_path / "emb.h5"
    sam = load_sam(tiny_checkpoints.sam)
    fingerprint = encoder_fingerprint(sam.image_encoder, sam.image_encoder.img_size)
    writer = EmbeddingStoreWriter(out, fingerprint, "float32")
    first = _fresh(SamMaskHead(sam), paths[:1])[0]
    writer.add(content_key(paths[0]), first)
    writer.close()  # killed before finishing: no store yet
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="still being written"):
        EmbeddingStore(out)
    main(_config(tiny_checkpoints, folder, out, dtype="float32"))
    store = EmbeddingStore(out, fingerprint)
    assert len(store) == 2
    assert torch.equal(store.get(content_key(paths[0])), first)
    assert not out.with_name("emb.h5.partial").exists()


def test_bad_input_names_the_flag(tiny_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: --image_dirs"):
        main(_config(tiny_checkpoints, tmp_path / "missing", tmp_path / "e.h5"))
    with pytest.raises(ValueError, match="--out is required"):
        SamEmbeddingsConfig(sam_checkpoint="x", image_dirs="y")
