"""compare.py --select: the recipe chosen by measuring on a validation split, and the model saved with its table."""

import json
import os

import pytest

from conftest import fail, last_line, no_temporaries
from gaprune.errors import InputError
from gaprune.evaluation import evaluate_triples
from gaprune.model import compare
from gaprune.modeling import load_embedder
from gaprune.selection import Objective, select


def row(method, domain, general):
    return {"method": method, "domain": {"ndcg@10": domain}, "general": {"ndcg@10": general}}


DENSE = row("dense", 0.50, 0.80)
TABLE = [row("a", 0.52, 0.70),   # most domain, general -12.5%
         row("b", 0.51, 0.79),   # general -1.25%
         row("c", 0.49, 0.80),   # general kept, domain -2%
         row("d", 0.51, 0.795)]  # ties b on domain, more general


@pytest.mark.parametrize("objective, expected", [
    (Objective("domain"), "a"),
    (Objective("domain", max_general_drop=2), "d"),  # b and d tie on domain; d keeps more general text
    (Objective("domain", max_general_drop=0), "c"),
    (Objective("general"), "c"),
    # mean changes: a (+4 - 12.5) / 2, b (+2 - 1.25) / 2, c (-2 + 0) / 2, d (+2 - 0.625) / 2
    (Objective("mean"), "d"),
])
def test_select_picks_what_the_hand_computed_table_says(objective, expected):
    assert select(TABLE, DENSE, objective)["method"] == expected


def test_select_refuses_an_unmet_floor_naming_the_closest_candidate():
    with pytest.raises(InputError, match=r"no candidate keeps the general nDCG@10 within 0.5% of the dense model's; "
                                         r"the closest is c \(general -1.25%, domain -2.00%\)"):
        select([TABLE[0], row("c", 0.49, 0.79)], DENSE, Objective("domain", max_general_drop=0.5))


@pytest.mark.parametrize("kwargs, message", [({"side": "speed"}, "--select must be one of domain, general, mean"),
                                             ({"max_general_drop": -1.0}, "at least 0, got -1.0"),
                                             ({"max_general_drop": float("nan")}, "at least 0, got nan")])
def test_bad_objectives_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        Objective(**kwargs)


def triples_of(path):
    return json.load(open(path, encoding="utf-8"))


def select_args(tmp_path, qwen3_dir, data_files, score_files, *extra):
    files = score_files["qwen3"]
    return ["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
            data_files["general"], "--general_fisher_scores", files["general"], "--domain_fisher_scores",
            files["domain"], "--alignment_scores", files["alignment"], "--output_dir", str(tmp_path),
            "--sparsity", "0.5", *extra]


def test_select_saves_the_winner_of_its_own_table_with_the_table(capsys, tmp_path, qwen3_dir, data_files,
                                                                score_files):
    folder = compare.main(select_args(tmp_path, qwen3_dir, data_files, score_files, "--select", "mean", "--scorers",
                                      "magnitude", "domain_fisher", "random", "--seed", "3"))
    out = capsys.readouterr().out
    assert last_line(out) == folder and out.index("Selecting among 3 candidates at 50%") < out.index("| dense |")
    assert "calibrate" not in out.split("| dense |")[0]  # none of these three calibrates
    report = json.load(open(next(os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.endswith(".json"))))
    dense, *rows = report["rows"]
    changes = {r["method"]: sum(100 * (r[s]["ndcg@10"] - dense[s]["ndcg@10"]) / dense[s]["ndcg@10"]
                                for s in ("domain", "general")) / 2 for r in rows}
    best = max(changes, key=changes.get)
    selection = json.load(open(os.path.join(folder, "selection.json")))
    assert selection["selected"] == best and os.path.basename(folder) == f"tiny-qwen3_{best}_prune_50%"
    assert [r["method"] for r in selection["rows"]] == ["dense", "magnitude", "domain_fisher", "random"]
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "## How this recipe was chosen" in card and f"kept `{best}`" in card and "| random | 50% |" in card
    assert "Not evaluated" not in card  # the validation figures the choice was made on
    from gaprune.evaluation import overlap_warnings
    assert overlap_warnings(folder, {"x.json": triples_of(data_files["chem"])})  # chosen on it: not held out
    saved = load_embedder(folder, "cpu", "float32")  # the saved model is the row that was measured
    triples = json.load(open(data_files["chem"]))
    winner = next(r for r in rows if r["method"] == best)
    assert evaluate_triples(saved, triples)["metrics"]["ndcg@10"] == pytest.approx(winner["domain"]["ndcg@10"],
                                                                                    abs=1e-4)
    mlp = [p for n, p in saved.model.named_parameters() if "mlp" in n and p.dim() == 2]
    assert sum(int((p == 0).sum()) for p in mlp) == sum(p.numel() for p in mlp) // 2
    assert no_temporaries(tmp_path)


def test_select_refuses_an_unmet_floor_after_writing_its_table(capsys, tmp_path, qwen3_dir, data_files, score_files,
                                                               monkeypatch):
    scripted = iter([DENSE, TABLE[0], row("c", 0.49, 0.79)])  # the dense model, then each candidate's metrics
    monkeypatch.setattr(compare, "evaluated", lambda *args: {key: value for key, value in next(scripted).items()
                                                             if key != "method"})
    line = fail(capsys, compare.main, select_args(tmp_path, qwen3_dir, data_files, score_files, "--select",
                                                  "domain", "--max_general_drop", "0.5", "--scorers", "magnitude",
                                                  "random"))
    assert line == ("error: no candidate keeps the general nDCG@10 within 0.5% of the dense model's; the closest is "
                    "random (general -1.25%, domain -2.00%)")
    assert sorted(f.rsplit(".", 1)[1] for f in os.listdir(tmp_path)) == ["json", "md"]  # the table, no model


@pytest.mark.parametrize("extra, message", [
    (["--select", "domain", "--sparsity", "0.5", "0.6"], "--select chooses among recipes at one budget"),
    (["--max_general_drop", "2"], "--max_general_drop is the floor of --select's choice: give --select"),
    (["--select", "domain", "--scorers", "magnitude:layer_shares=magnitude"], "magnitude does not take layer_shares"),
    (["--select", "domain", "--scorers", "sparsegpt:reconstruct=maybe"], "bad value for reconstruct"),
])
def test_bad_selection_requests_get_one_line_before_any_model_loads(capsys, tmp_path, qwen3_dir, data_files,
                                                                    score_files, extra, message):
    assert message in fail(capsys, compare.main, select_args(tmp_path, qwen3_dir, data_files, score_files, *extra))
    assert not os.listdir(tmp_path)


def test_default_candidates_leave_out_those_the_score_files_cannot_serve(tmp_path, qwen3_dir, data_files,
                                                                       score_files, caplog):
    """Without --scorers the candidates are the defaults: without calibration texts no Wanda or SparseGPT; with
    an alignment file of the published product mode, none of those that read cosines."""
    files = score_files["qwen3"]
    args = compare.build_parser().parse_args(
        ["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
         data_files["general"], "--general_fisher_scores", files["general"], "--domain_fisher_scores", files["domain"],
         "--select", "domain"])
    from gaprune.spec import score_files_from_args
    labels = [label for label, _ in compare.row_specs(args, score_files_from_args(args))]
    assert labels == ["magnitude", "domain_fisher", "dai", "aligned_saliency"]  # no alignment: both run without
    with_texts = compare.build_parser().parse_args(
        ["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
         data_files["general"], "--general_fisher_scores", files["general"], "--domain_fisher_scores", files["domain"],
         "--alignment_scores", files["alignment"], "--calibration_data", data_files["chem"], "--select", "domain"])
    specs = dict(compare.row_specs(with_texts, score_files_from_args(with_texts)))
    assert list(specs) == ["magnitude", "domain_fisher", "dai", "wanda", "sparsegpt",
                           "sparsegpt:reconstruction_target=dense"]  # the product-mode alignment: no cosines
    assert specs["sparsegpt:reconstruction_target=dense"].reconstruction_target == "dense"
    assert specs["sparsegpt"].reconstruction_target != "dense"
    at_2_4 = compare.build_parser().parse_args([*sys_args(with_texts), "--sparsity_pattern", "2:4"])
    labels = [label for label, _ in compare.row_specs(at_2_4, score_files_from_args(at_2_4))]
    assert "wanda" in labels and "sparsegpt:group_order=hessian" in labels  # N:M: the group order, no layer shares
    assert not [label for label in labels if "layer_shares" in label]


def sys_args(args) -> list[str]:
    """The flags of a parsed compare.py request, again as a command line (those given above)."""
    flags = ["model_path", "general_fisher_scores", "domain_fisher_scores", "alignment_scores", "calibration_data",
             "select"]
    return [item for flag in flags for item in (f"--{flag}", getattr(args, flag))] + [
        "--domain_data_paths", *args.domain_data_paths, "--general_data_paths", *args.general_data_paths]


def test_the_plan_counts_the_calibration_texts_of_both_sides():
    from gaprune import CalibrationSpec, PruneSpec
    from gaprune.pruning import Calibration
    texts = CalibrationSpec(domain_data=["a chemistry text"] * 5, general_data=["a web text"] * 3)
    rows = [("wanda", PruneSpec(scorer="wanda", sparsity=0.5, calibration=texts)),
            ("magnitude", PruneSpec(scorer="magnitude", sparsity=0.5))]
    held_out = {"domain": {"d": [{}] * 4}, "general": {"g": [{}] * 6}}
    plan = compare.selection_plan(rows, Objective("domain", 1.0), held_out,
                                  Calibration({"domain": ["x"] * 5, "general": ["y"] * 3}, 0.5), 30.0)
    assert plan.splitlines() == [
        "Selecting among 2 candidates at 50% by the most domain nDCG@10, general nDCG@10 at most 1% below the dense "
        "model's, on 10 validation triples (their evaluations alone: about 1.0 min here, 30.0 s each; 1 of them also "
        "calibrate on 8 texts):", "  wanda", "  magnitude"]


def test_select_among_block_scorers_removes_the_layers_sparsemodel_would(capsys, tmp_path, qwen3_dir, data_files,
                                                                        score_files):
    """--structure layers: each row is a block scorer; the saved winner lost the blocks its row names, which are
    those SparseModel.py --structure layers removes with that scorer."""
    from transformers import AutoConfig

    from gaprune.model import SparseModel
    calibration = ["--calibration_data", data_files["chem"], "--general_calibration_data", data_files["general"]]
    folder = compare.main(select_args(tmp_path / "c", qwen3_dir, data_files, score_files, "--structure", "layers",
                                      "--sparsity", "0.5", "--select", "general", "--scorers", "block_influence",
                                      "skip_loss", "magnitude", *calibration))
    capsys.readouterr()
    selection = json.load(open(os.path.join(folder, "selection.json")))
    rows = {r["method"]: r for r in json.load(open(next(
        os.path.join(tmp_path / "c", f) for f in os.listdir(tmp_path / "c") if f.endswith(".json"))))["rows"]}
    assert set(rows) == {"dense", "block_influence", "skip_loss", "magnitude"}
    best = max(["block_influence", "skip_loss", "magnitude"], key=lambda m: (rows[m]["general"]["ndcg@10"],
                                                                             rows[m]["domain"]["ndcg@10"]))
    assert selection["selected"] == best
    layers = AutoConfig.from_pretrained(qwen3_dir).num_hidden_layers
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == layers - 1
    alone = SparseModel.main(["--model_path", qwen3_dir, "--structure", "layers", "--structured_pct", "0.5",
                              "--block_scoring", "block_influence", *calibration, "--output_dir", str(tmp_path / "s")])
    capsys.readouterr()
    stats = json.load(open(os.path.join(alone, "structured_prune_stats.json")))
    assert rows["block_influence"]["removed_layers"] == stats["removed_layers"]
