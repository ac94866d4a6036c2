import json
import os
import tempfile

import pytest
import torch

from conftest import last_line
from gaprune import sampling
from gaprune.cli import run, str2bool
from gaprune.features import sample


def test_one_record_per_planted_cluster():
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1) * 10
    points = torch.cat([c + 0.05 * torch.randn(30, 16, generator=generator) for c in centers])
    chosen = sampling.select_diverse(points, 6, seed=1)
    assert sorted(i // 30 for i in chosen) == list(range(6))
    assert chosen == sampling.select_diverse(points, 6, seed=1)


def test_kmeans_blocks_give_the_same_assignment(monkeypatch):
    points = torch.randn(500, 8, generator=torch.Generator().manual_seed(3))
    whole = sampling.kmeans(points, 20, seed=5)
    monkeypatch.setattr(sampling, "BLOCK_ELEMENTS", 64)  # 3 rows per block
    torch.testing.assert_close(sampling.kmeans(points, 20, seed=5), whole)


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("1", True), ("0", False),
                                         ("yes", True), ("No", False)])
def test_bool_flags_parse_as_written(text, value):
    assert str2bool(text) is value
    assert sample.build_parser().parse_args(["--use_streaming", text]).use_streaming is value


def run_sample(capsys, model_dir, data, out, *extra):
    path = sample.main(["--input_file", data, "--output_file", str(out), "--model_name", model_dir,
                        "--batch_size", "5", *extra])
    assert last_line(capsys.readouterr().out) == str(out)
    return json.load(open(path, encoding="utf-8"))


def test_sampling_is_seeded_and_streaming_matches_in_memory(capsys, tmp_path, qwen3_dir, data_files, chem_triples,
                                                            monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    streamed = run_sample(capsys, qwen3_dir, data_files["chem"], tmp_path / "a.json", "--target_sample_size", "5")
    again = run_sample(capsys, qwen3_dir, data_files["chem"], tmp_path / "b.json", "--target_sample_size", "5")
    in_memory = run_sample(capsys, qwen3_dir, data_files["chem"], tmp_path / "c.json", "--target_sample_size", "5",
                           "--use_streaming", "False")
    assert streamed == again == in_memory
    assert 1 <= len(streamed) <= 5 and all(r in chem_triples for r in streamed)
    assert len({r["query"] for r in streamed}) == len(streamed)
    assert not [d for d in os.listdir(tmp_path) if d.startswith("gaprune-sample-")]


def test_fewer_records_than_target_are_written_unchanged(capsys, tmp_path, qwen3_dir, data_files, chem_triples):
    out = run_sample(capsys, qwen3_dir, data_files["chem"], tmp_path / "all.json", "--target_sample_size", "500")
    assert out == chem_triples


def test_streaming_folder_is_removed_after_a_failure(capsys, tmp_path, qwen3_dir, data_files, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = []

    def broken_embed(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        return torch.ones(len(texts), 4)

    monkeypatch.setattr(sampling.Embedder, "embed", broken_embed)
    with pytest.raises(RuntimeError, match="simulated failure"):
        sample.main(["--input_file", data_files["chem"], "--output_file", str(tmp_path / "x.json"),
                     "--model_name", qwen3_dir, "--target_sample_size", "3", "--batch_size", "2"])
    assert len(calls) == 2
    assert not [d for d in os.listdir(tmp_path) if d.startswith("gaprune-sample-")]
    assert not os.path.exists(tmp_path / "x.json")


def test_bad_text_key_and_bad_flag(capsys, tmp_path, qwen3_dir, data_files):
    for argv, message in ((["--text_key", "title"], "record 0 has no 'title' field"),
                          (["--use_streaming", "maybe"], "expected True/False")):
        with pytest.raises(SystemExit) as exit_info:
            run(sample.main, ["--input_file", data_files["chem"], "--output_file", str(tmp_path / "o.json"),
                              "--model_name", qwen3_dir, *argv])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not os.path.exists(tmp_path / "o.json")


def test_hold_out_sets_aside_seeded_records_and_every_record_sharing_a_query_or_positive():
    from gaprune.data import hold_out
    records = [{"query": f"q{i}", "positive": f"p{i}", "negative": "shared negative"} for i in range(10)]
    records += [{"query": "q3", "positive": "other", "negative": "n"},  # shares a query with record 3
                {"query": "other", "positive": "p4", "negative": "n"},  # shares a positive with record 4
                {"query": "x", "positive": "y", "negative": "q3"},  # record 3's query as a hard negative
                {"query": "z", "positive": ["a", "list"], "negative": "shared negative"}]  # not a text: kept
    assert hold_out(records, 4, seed=0) == hold_out(records, 4, seed=0) != hold_out(records, 4, seed=1)
    for seed in range(50):
        rest, validation = hold_out(records, 4, seed)
        assert len(validation) == 4 and all(r in records for r in validation)
        held = {r[k] for r in validation for k in ("query", "positive") if isinstance(r[k], str)}
        assert rest == [r for r in records if r not in validation and not {r["query"], r["negative"]} & held
                        and not (isinstance(r["positive"], str) and r["positive"] in held)]
        if records[3] in validation and records[4] in validation and not {10, 11, 12, 13} & set(
                records.index(r) for r in validation):
            assert records[10] not in rest and records[11] not in rest and records[12] not in rest
            assert records[13] in rest  # "shared negative" is a validation negative only: no relevance judgement
            break
    else:
        pytest.fail("no seed of 50 set aside records 3 and 4 but none of 10 to 13")
    rest, validation = hold_out(records, 14 - 1, seed=2)
    assert len(validation) == 13 and len(rest) <= 1
    for size in (0, 14):
        with pytest.raises(Exception, match="--validation_size must be at least 1 and below the 14 records"):
            hold_out(records, size, seed=0)


def test_the_validation_split_reaches_no_scoring_or_calibration_stage(capsys, tmp_path, qwen3_dir, data_files,
                                                                     monkeypatch):
    """Every text the model reads in fisher.py, gradient.py and a calibrated SparseModel.py run on the samples is
    compared with the validation split's queries and positives: none of them may be read."""
    from gaprune.features import fisher, gradient
    from gaprune.model import SparseModel
    from gaprune.modeling import Embedder
    samples = {}
    for side in ("chem", "general"):
        out = tmp_path / f"{side}.json"
        samples[side] = run_sample(capsys, qwen3_dir, data_files[side], out, "--target_sample_size", "6",
                                   "--validation_size", "4")
        samples[side + "-validation"] = json.load(open(tmp_path / f"{side}-validation.json", encoding="utf-8"))
    held = {r[k] for side in ("chem", "general") for r in samples[side + "-validation"] for k in ("query", "positive")}
    assert len(held) == 16 and not held & {r[k] for s in ("chem", "general") for r in samples[s] for k in r}
    read: list[str] = []
    tokenize = Embedder.tokenize
    monkeypatch.setattr(Embedder, "tokenize", lambda self, texts: read.extend(texts) or tokenize(self, texts))
    chem, general = str(tmp_path / "chem.json"), str(tmp_path / "general.json")
    fisher.main(["--model_name", qwen3_dir, "--data_path", chem, "--output_dir", str(tmp_path / "f"), "--batch_size", "2"])
    gradient.main(["--model_name", qwen3_dir, "--domain_data_path", chem, "--general_data_path", general,
                   "--output_dir", str(tmp_path / "g"), "--batch_size", "4", "--no-use_distributed"])
    SparseModel.main(["--model_path", qwen3_dir, "--structure", "layers", "--num_layers_removed", "1",
                      "--calibration_data", chem, "--general_calibration_data", general,
                      "--output_dir", str(tmp_path / "m")])
    assert len(set(read)) >= 12 and not held & set(read)
    capsys.readouterr()
