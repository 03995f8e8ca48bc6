"""Every registered family through the builders: one mixture, encoded and collated for the model."""

from types import SimpleNamespace

from tests.data_fixtures import write_reason_seg
from tests.utils.data import loader_fixtures as fx
from utils.data.builders import DataConfig, build_train_dataset, eval_records
from utils.data.samples import collate


def test_mixture_of_every_family_encodes_and_collates(tmp_path, tiny_model_and_encoder):
    model, tokenizer, encoder = tiny_model_and_encoder
    dataset_dir, masks_dir = write_reason_seg(tmp_path, "train", 2)
    fx.write_ade20k(dataset_dir, masks_dir)
    fx.write_cocostuff(dataset_dir, masks_dir)
    fx.write_mapillary(dataset_dir, masks_dir)
    fx.write_pascal_part(dataset_dir, masks_dir)
    fx.write_paco_lvis(dataset_dir, masks_dir)
    fx.write_refer(dataset_dir, masks_dir)
    fx.write_refclef(dataset_dir, masks_dir)
    fx.write_vqa(dataset_dir)
    fx.write_llmseg40k(dataset_dir, masks_dir)
    # COCO-Stuff, PACO-LVIS and LLM-Seg40K share the coco2017 store
    fx.write_store(masks_dir / "coco2017", {"000000000009.jpg": 3, "000000000042.jpg": 2})
    families = ["sem_seg", "refer_seg", "reason_seg", "vqa", "llmseg40k"]
    config = DataConfig(
        dataset_dir=str(dataset_dir),
        sam_masks_dir=str(masks_dir),
        dataset="||".join(families),
        sample_rates="1,1,1,1,1",
        refer_seg_data="refclef||refcoco",
    )
    config.seed = 0  # TrainConfig's field, read by build_train_dataset
    train = build_train_dataset(config, encoder, length=40)
    samples = [train[i] for i in range(40)]
    assert {s.record.dataset for s in samples} >= {
        "ade20k", "cocostuff", "mapillary", "pascal_part", "paco_lvis", "refcoco", "refclef",
        "ReasonSeg", "llava_instruct_150k", "LLM-Seg40K",
    }  # fmt: skip
    for start in range(0, 40, 4):
        batch, _ = collate(samples[start : start + 4], tokenizer.pad_token_id)
        counts = batch.validate(model.seg_token_id)
        assert counts == [s.masks.shape[0] for s in samples[start : start + 4]]

    specs = ["ReasonSeg|train", "refcoco|unc|val", "LLMSeg40K|validation", "llmseg40k|test"]
    config = SimpleNamespace(**{**vars(config), "llmseg40k_dir": "LLM-Seg40K"})
    for spec in specs:
        for record in eval_records(config, spec):
            sample = encoder(record)
            assert sample.masks.shape[0] == sum(c.num_seg for c in sample.conversations) >= 1
            assert sample.proposal_masks.shape[0] > 0
