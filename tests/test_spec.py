"""One request, checked once: PruneSpec refuses what cannot work with the CLI's message, notes what is legal
but useless, and the API, SparseModel.py, compare.py and example_usage.sh all go through it."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

import gaprune
from conftest import fail, listing
from gaprune import api, modeling
from gaprune.cli import run
from gaprune.errors import InputError
from gaprune.model import SparseModel, compare
from gaprune.modeling import meta_model
from gaprune.spec import CalibrationSpec, PruneSpec, ScoreFiles, applicable_options
from gaprune.toy_models import build_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a short calibration text", "another one about acids", "a third about tennis"]


@pytest.mark.parametrize("sparsity, message", [(1.5, "--unstructured_pct must be between 0 and 1, got 1.5"),
                                               (-0.2, "--unstructured_pct must be between 0 and 1, got -0.2"),
                                               (math.nan, "--unstructured_pct must be a finite number"),
                                               ("0.5", "--unstructured_pct must be a finite number, got '0.5'"),
                                               (True, "--unstructured_pct must be a finite number")])
def test_a_share_outside_0_1_nan_or_a_string_is_refused_with_the_cli_message(sparsity, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        PruneSpec(scorer="magnitude", sparsity=sparsity)


@pytest.mark.parametrize("fields, message", [
    ({"scorer": "obc"}, "unknown scorer 'obc'"),
    ({"layer_types": "mlp"}, "--sparsify_layers takes one or more layer types"),
    ({"layer_types": ("mlp", "conv")}, "unknown layer type"),
    ({"rho_min": 0.9, "rho_max": 0.1}, "need 0 <= --rho_min <= --rho_max <= 1"),
    ({"strategy": "local"}, "--layer_budget_strategy takes global, uniform, not 'local'"),
    ({"seed": 1.5}, "--seed must be a whole number"),
    ({"config": {"beta": 1.0}}, "config must be a DAIConfig"),
    ({"config": gaprune.DAIConfig(beta=math.inf)}, "beta must be a finite number"),
    ({"reconstruct": "yes"}, "reconstruct must be True or False"),
    ({"pattern": "4:2"}, "sparsity pattern must be 'unstructured' or N:M"),
    ({"pattern": "2:4", "sparsity": 0.3}, "prunes 0.5 of the weights; --unstructured_pct 0.3 contradicts it"),
    ({"pattern": "2:4", "strategy": "uniform"}, "the 2:4 pattern fixes it in every group of 4"),
    ({"structure": "channels", "sparsity": 0.5, "layer_types": ("attention",)},
     "--sparsify_layers chooses masked weights; --structure channels removes"),
    ({"structure": "channels", "sparsity": 0.5, "strategy": "uniform"}, "--layer_budget_strategy applies to masks"),
    ({"structure": "channels", "sparsity": 0.0}, "needs --structured_pct between 0 and 1"),
    ({"structure": "heads", "sparsity": 0.5, "scorer": "wanda"}, "needs a score-based scorer, not wanda"),
    ({"scorer": "wanda", "sparsity": 0.5}, "need --calibration_data and/or --general_calibration_data"),
    ({"scorer": "wanda", "sparsity": 0.5, "strategy": "uniform", "calibration": CalibrationSpec(domain_data=TEXTS)},
     "wanda takes its share of each row"),
])
def test_what_cannot_work_is_refused_when_the_request_is_made(fields, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruneSpec(**{"scorer": "magnitude", "sparsity": 0.5, **fields})


@pytest.mark.parametrize("fields, message", [
    ({}, "need --calibration_data and/or --general_calibration_data"),
    ({"domain_data": TEXTS, "samples": 0}, "--calibration_samples must be a whole number of at least 1, got 0"),
    ({"domain_data": TEXTS, "batch_size": 2.5}, "--calibration_batch_size must be a whole number"),
    ({"domain_data": TEXTS, "mix": 0.5}, "--calibration_mix 0.5 needs both"),
    ({"domain_data": TEXTS, "mix": math.nan}, "--calibration_mix must be a finite number"),
    ({"domain_data": [1, 2]}, "--calibration_data must be a triple file's path or a list of texts"),
    ({"domain_data": TEXTS, "weighting": "entropy"}, "--calibration_weighting takes uniform, loss_gradient"),
])
def test_calibration_requests_are_checked_too(fields, message):
    with pytest.raises(InputError, match=message):
        CalibrationSpec(**fields)


def test_a_spec_is_frozen_and_keyword_only():
    spec = PruneSpec(scorer="magnitude", sparsity=0.5, layer_types=["mlp"])
    assert spec.layer_types == ("mlp",)  # normalised, so equal requests compare equal
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sparsity = 0.9
    with pytest.raises(TypeError):
        PruneSpec("magnitude", 0.5)
    with pytest.raises(InputError, match="--unstructured_pct must be between 0 and 1"):
        dataclasses.replace(spec, sparsity=2.0)  # every changed copy is checked again


def test_legal_but_useless_requests_are_noted():
    assert "--unstructured_pct 0 prunes nothing" in PruneSpec().notes()[0]  # the published default
    assert "zeroes every mlp weight" in PruneSpec(scorer="magnitude", sparsity=1.0).notes()[0]
    unread = PruneSpec(scorer="aligned_saliency", sparsity=0.5, config=gaprune.DAIConfig(beta=2.0, domain_weight=2.0))
    assert unread.notes() == ["--beta: not read by aligned_saliency; ignored"]
    assert "the global budget ignores them" in PruneSpec(scorer="magnitude", sparsity=0.5, rho_min=0.2).notes()[0]
    assert PruneSpec(scorer="magnitude", sparsity=0.5, strategy="uniform", rho_min=0.2).notes() == []
    ignored = PruneSpec(scorer="magnitude", sparsity=0.5, calibration=CalibrationSpec(domain_data=TEXTS))
    assert ignored.notes() == ["calibration flags are only used by wanda, sparsegpt, --reconstruct and the block "
                               "measurements of --structure layers; ignored"]


def test_compare_rows_keep_the_options_only_for_the_pruners_that_take_them():
    asked = {"layer_shares": "magnitude", "group_order": "hessian", "reconstruction_target": "dense"}
    assert applicable_options("sparsegpt", False, **asked) == asked
    assert applicable_options("wanda", False, **asked) == {"layer_shares": "magnitude", "group_order": "natural",
                                                           "reconstruction_target": "own"}
    assert applicable_options("magnitude", True, **asked) == {"layer_shares": "uniform", "group_order": "natural",
                                                              "reconstruction_target": "dense"}


def test_check_model_needs_every_candidate_row_to_hold_whole_groups(tmp_path):
    odd = build_bert(str(tmp_path / "odd-bert"), hidden_size=36, intermediate_size=60, num_heads=4)
    model = meta_model(odd)  # shapes only: nothing is read from the safetensors file
    assert all(p.is_meta for p in model.parameters())
    assert PruneSpec(scorer="magnitude", pattern="2:4").check_model(model) == []
    with pytest.raises(InputError, match=r"the 4:8 pattern needs rows whose length is a multiple of 8; "
                                         r".*intermediate.dense.weight has 36"):
        PruneSpec(scorer="magnitude", pattern="4:8").check_model(model)
    notes = PruneSpec(scorer="magnitude", structure="channels", sparsity=0.33).check_model(model)
    assert notes == ["--structured_pct 0.33 removes 19 of 60 channels per layer (0.3167)"]
    with pytest.raises(InputError, match="removes no channels"):
        PruneSpec(scorer="magnitude", structure="channels", sparsity=0.01).check_model(model)


def test_the_api_checks_its_arguments_as_the_cli_does(bert_dir, data_files):
    with pytest.raises(InputError, match="spec must be a gaprune.PruneSpec, got float"):
        api.prune(bert_dir, 0.5)
    with pytest.raises(InputError, match="model must be a gaprune Embedder .* got int"):
        api.prune(3, PruneSpec(scorer="magnitude", sparsity=0.5))
    with pytest.raises(InputError, match="scores must be a ScoreFiles, got dict"):
        api.prune(bert_dir, PruneSpec(scorer="magnitude", sparsity=0.5), {"domain_fisher": "x.json"})
    with pytest.raises(InputError, match="--batch_size must be a whole number of at least 1, got 0"):
        api.evaluate(bert_dir, data_files["chem"], batch_size=0)
    with pytest.raises(InputError, match="--max_samples must be a whole number of at least 1, got -1"):
        api.fisher(bert_dir, data_files["chem"], max_samples=-1)
    with pytest.raises(InputError, match="--data_path must be a file path, got 3"):
        api.fisher(bert_dir, 3)
    with pytest.raises(InputError, match="--alignment_mode takes product, local_cosine, row_cosine, not 'cos'"):
        api.alignment(bert_dir, data_files["general"], data_files["chem"], alignment_mode="cos")
    with pytest.raises(InputError, match="--batch_size must be at least 2"):
        api.alignment(bert_dir, data_files["general"], data_files["chem"], batch_size=1)
    with pytest.raises(InputError, match="--accumulate_on takes"):
        api.fisher(bert_dir, data_files["chem"], accumulate_on="gpu")
    with pytest.raises(InputError, match="--general_fisher_scores must be a file path"):
        ScoreFiles(general_fisher=3)


def test_the_api_logs_notes_and_prunes_as_the_spec_says(caplog, bert_dir):
    embedder = gaprune.load_embedder(bert_dir, "cpu")
    with caplog.at_level("WARNING"):
        result = gaprune.prune(embedder, PruneSpec(scorer="magnitude", pattern="2:4"))
    mlp = {n: p for n, p in embedder.model.named_parameters() if "intermediate" in n or
           ("output.dense" in n and "attention" not in n)}
    assert result.masked == sum(p.numel() for n, p in mlp.items() if p.dim() == 2) // 2
    assert caplog.text == ""  # nothing degenerate about it
    with caplog.at_level("WARNING"):
        gaprune.prune(embedder, PruneSpec(scorer="magnitude", sparsity=0.0))
    assert "prunes nothing" in caplog.text


def test_dry_run_checks_the_request_against_the_shapes_without_weights(monkeypatch, capsys, tmp_path, bert_dir):
    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run loaded the model")

    monkeypatch.setattr(modeling, "load_embedder", no_weights)
    out = tmp_path / "out"
    folder = SparseModel.main(["--model_path", bert_dir, "--output_dir", str(out), "--unstructured_pct", "0.5",
                               "--unstructured_scoring", "aligned_saliency", "--dry_run"])
    assert folder == str(out / "tiny-bert_aligned_saliency_prune_50%") and listing(out) == []
    assert "Request checked (no weights loaded)" in capsys.readouterr().out
    for extra, message in ((["--structure", "heads", "--structured_pct", "0.5"], "not available for bert-family"),
                           (["--sparsity_pattern", "2:4", "--unstructured_scoring", "wanda"],
                            "need --calibration_data"),
                           (["--unstructured_pct", "0.5", "--domain_fisher_scores", str(tmp_path / "none.json")],
                            "none.json")):
        with pytest.raises(SystemExit) as exit_info:
            run(SparseModel.main, ["--model_path", bert_dir, "--output_dir", str(out), *extra, "--dry_run"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and "Traceback" not in err
    assert listing(out) == []


def test_compare_refuses_an_option_no_row_takes(tmp_path, bert_dir, data_files):
    common = ["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
              data_files["general"], "--output_dir", str(tmp_path / "out")]
    with pytest.raises(InputError, match="--group_order sets the order of sparsegpt's N:M groups, not of magnitude"):
        compare.main([*common, "--scorers", "magnitude", "random", "--group_order", "hessian",
                      "--sparsity_pattern", "2:4"])
    with pytest.raises(InputError, match="--sparsity values must be between 0 and 1, got 2.0"):
        compare.main([*common, "--scorers", "magnitude", "--sparsity", "2"])
    with pytest.raises(InputError, match="scorer domain_fisher needs --domain_fisher_scores"):
        compare.main([*common, "--scorers", "domain_fisher"])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("env, message", [({"SCORER": "sparsegpt"}, "need --calibration_data"),
                                          ({"STRUCTURE": "heads"}, "not available for bert-family models"),
                                          ({"STRUCTURE": "channels", "SPARSITY": "1"}, "between 0 and 1 (exclusive)")])
def test_example_usage_refuses_a_request_the_last_stage_would_refuse_before_stage_one(tmp_path, bert_dir, env,
                                                                                      message):
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(REPO, "example_usage.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "DEVICE": "cpu", "MODEL": bert_dir, **env})
    assert proc.returncode != 0 and message in proc.stderr and "==> " not in proc.stderr, proc.stderr[-2000:]
    assert "no stage was run" in proc.stderr and time.monotonic() - start < 60


SCRIPTS = ["gaprune.features.sample", "gaprune.features.fisher", "gaprune.features.gradient",
           "gaprune.model.SparseModel", "gaprune.model.compare", "gaprune.model.evaluate", "gaprune.model.retrain",
           "gaprune.model.export"]


def test_help_shows_defaults_and_a_recipe_without_importing_torch():
    probe = ("import contextlib, io, runpy, sys\n"
             "out = io.StringIO()\n"
             "for module in sys.argv[1:]:\n"
             "    sys.argv = [module, '--help']\n"
             "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
             "        runpy.run_module(module, run_name='__main__')\n"
             "    print(module, 'torch' in sys.modules, 'Example:' in out.getvalue(), file=sys.stderr)\n"
             "print(out.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", probe, *SCRIPTS], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.stderr.splitlines() == [f"{module} False True" for module in SCRIPTS], proc.stderr
    assert re.search(r"--unstructured_pct UNSTRUCTURED_PCT\s+share of candidate weights to zero, 0..1\s+"
                     r"\(default:\s+0.0\)", proc.stdout)
    assert re.search(r"--steps STEPS\s+\(default: 100\)", proc.stdout)  # a flag with no help shows its default too


def test_evaluate_warns_when_the_queries_were_in_the_pruning_data(caplog, capsys, tmp_path, bert_dir, data_files,
                                                                  score_files):
    from gaprune.model import evaluate

    files = score_files["bert"]
    folder = SparseModel.main(["--model_path", bert_dir, "--output_dir", str(tmp_path / "model"), "--unstructured_pct",
                               "0.5", "--domain_fisher_scores", files["domain"], "--unstructured_scoring",
                               "domain_fisher"])
    fisher_data = json.load(open(files["domain"]))["metadata"]["data_path"]
    held_out = tmp_path / "held-out.json"
    held_out.write_text(json.dumps([{"query": "a query nobody scored", "positive": "p", "negative": "n"}] * 2))
    with caplog.at_level("WARNING"):
        evaluate.main(["--model_path", folder, "--data_paths", fisher_data, str(held_out), "--output_file",
                       str(tmp_path / "eval.json")])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    triples = len(json.load(open(fisher_data)))
    assert warnings == [f"{triples} of the {triples} queries of {fisher_data} are in {fisher_data}, which "
                        f"{os.path.basename(folder)} was pruned, chosen or retrained on: not a held-out measurement"]


def test_gradients_that_are_rounding_noise_are_named():
    assert api.vanishing_gradients(0.3, {"a": 1e-5, "b": 1.0e-8}) == []  # a normal pass: one layer above the floor
    assert "the contrastive loss is 2e-05" in api.vanishing_gradients(2e-5, {"a": 1e-3})[0]
    flat = api.vanishing_gradients(0.3, {"a": 1.01e-8, "b": 1.9e-8})
    assert len(flat) == 1 and "within 2x of the 1e-08 floor" in flat[0]


def test_calibration_texts_cut_to_a_token_or_two_are_named(caplog, bert_dir):
    embedder = gaprune.load_embedder(bert_dir, "cpu")
    for max_length, warned in ((2, True), (None, False)):
        spec = PruneSpec(scorer="wanda", sparsity=0.5, calibration=CalibrationSpec(domain_data=TEXTS,
                                                                                   max_length=max_length))
        caplog.clear()
        with caplog.at_level("WARNING"):
            gaprune.prune(embedder, spec)
        assert ("the calibration texts average 2.0 tokens" in caplog.text) == warned, caplog.text


def compare_args(*extra):
    return compare.build_parser().parse_args(["--model_path", "m", "--domain_data_paths", "d.json",
                                              "--general_data_paths", "g.json", *extra])


def test_compare_rows_take_only_what_their_scorer_uses(data_files):
    rows = compare.row_specs(compare_args("--scorers", "magnitude", "wanda", "--calibration_data", data_files["chem"],
                                          "--calibration_weighting", "loss_gradient"))
    (_, magnitude), (_, wanda) = rows
    assert magnitude.calibration is None and wanda.calibration.weighting == "loss_gradient"
    with pytest.raises(InputError, match="this run has none"):
        compare.row_specs(compare_args("--scorers", "magnitude", "--calibration_data", data_files["chem"],
                                       "--calibration_weighting", "loss_gradient"))
    with pytest.raises(InputError, match="--sparsity 0.3 contradicts it"):  # compare's own flag, not SparseModel's
        compare.row_specs(compare_args("--scorers", "magnitude", "--sparsity_pattern", "2:4", "--sparsity", "0.3"))
    rows = compare.row_specs(compare_args("--scorers", "magnitude", "--sparsity_pattern", "2:4", "--sparsity", "0",
                                          "0.5"))
    assert [(label, spec.share) for label, spec in rows] == [("magnitude", 0.5)]  # one row per share actually pruned


def test_compare_notes_a_setting_only_when_every_row_ignores_it(data_files):
    def notes(*extra):
        args = compare_args(*extra)
        return compare.request_notes([spec for _, spec in compare.row_specs(args)], bool(args.calibration_data))
    assert notes("--scorers", "dai", "magnitude", "--beta", "2") == []  # dai reads it
    assert notes("--scorers", "magnitude", "random", "--beta", "2") == ["--beta: read by none of the scorers; ignored"]
    assert notes("--scorers", "magnitude", "wanda", "--calibration_data", data_files["chem"]) == []
    assert notes("--scorers", "magnitude", "--calibration_data", data_files["chem"]) == [
        "calibration flags are only used by wanda, sparsegpt, --reconstruct and the block measurements of "
        "--structure layers; ignored"]
    assert notes("--scorers", "magnitude", "--sparsity", "0") == [
        "--sparsity 0 prunes nothing: the folder will hold an unpruned copy (pass e.g. --sparsity 0.5 to zero half "
        "of the mlp weights)"]


def test_a_structured_share_is_noted_only_when_it_rounds_visibly(tmp_path):
    model = meta_model(build_bert(str(tmp_path / "bert60"), hidden_size=32, intermediate_size=60, num_heads=4))
    assert PruneSpec(scorer="magnitude", structure="channels", sparsity=0.3).check_model(model) == []  # 18 of 60
    assert PruneSpec(scorer="magnitude", structure="channels", sparsity=0.305).check_model(model) == []  # 0.005 off


def test_retrain_reads_its_data_before_the_model(monkeypatch, capsys, tmp_path, bert_dir):
    from gaprune.model import retrain

    monkeypatch.setattr(modeling, "load_embedder", lambda *a, **k: pytest.fail("loaded the model first"))
    line = fail(capsys, retrain.main, ["--model_path", bert_dir, "--data_path", str(tmp_path / "nope.json"),
                                       "--output_dir", str(tmp_path / "out")])
    assert "nope.json" in line
