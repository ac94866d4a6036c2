import json
import os

import numpy as np

import pytest

from safetensors import safe_open

from gaprune.features import fisher, gradient
from gaprune.toy_models import build_bert, build_qwen3

CHEM = "Instruct: Given a chemistry question, retrieve the related context.\nQuery: "
WEB = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "

CHEM_TOPICS = ["acetic acid buffer", "sodium chloride lattice", "benzene aromaticity", "copper sulfate colour",
               "enzyme kinetics", "gas chromatography", "ozone layer", "nickel catalyst", "polymer glass transition",
               "titration endpoint", "peroxide formers", "zeolite pores"]
WEB_TOPICS = ["paris landmarks", "pasta cooking", "tennis rules", "river rafting", "bike repair", "coffee brewing",
              "mountain hiking", "guitar chords", "tax deadlines", "bird migration", "train tickets", "garden soil"]


def make_triples(prefix: str, topics: list[str]) -> list[dict]:
    return [{"query": f"{prefix}What should I know about {topic}?",
             "positive": f"A short passage about {topic}, with the facts a reader needs.",
             "negative": f"An unrelated note on {topics[(i + 3) % len(topics)]} instead."}
            for i, topic in enumerate(topics)]


@pytest.fixture(scope="session")
def chem_triples():
    return make_triples(CHEM, CHEM_TOPICS)


@pytest.fixture(scope="session")
def web_triples():
    return make_triples(WEB, WEB_TOPICS)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory, chem_triples, web_triples):
    folder = tmp_path_factory.mktemp("data")
    paths = {}
    for name, triples in (("chem-example_sample.json", chem_triples), ("general-example.json", web_triples)):
        path = folder / name
        path.write_text(json.dumps(triples, indent=2), encoding="utf-8")
        paths[name.split("-")[0]] = str(path)
    return paths


def _corpus(triples):
    return [t[k] for t in triples for k in ("query", "positive", "negative")]


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, chem_triples, web_triples):
    return build_qwen3(str(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"),
                       extra_text=_corpus(chem_triples + web_triples))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, chem_triples, web_triples):
    return build_bert(str(tmp_path_factory.mktemp("bert") / "tiny-bert"), extra_text=_corpus(chem_triples + web_triples))


@pytest.fixture(params=["qwen3", "bert"])
def model_dir(request, qwen3_dir, bert_dir):
    return {"qwen3": qwen3_dir, "bert": bert_dir}[request.param]


@pytest.fixture(scope="session")
def score_files(tmp_path_factory, qwen3_dir, bert_dir, data_files):
    """fisher (general, domain) and gradient results for both tiny models, computed once."""
    files = {}
    for family, model_dir in (("qwen3", qwen3_dir), ("bert", bert_dir)):
        out = tmp_path_factory.mktemp(f"scores-{family}")
        common = ["--model_name", model_dir, "--max_samples", "6", "--batch_size", "2"]
        files[family] = {
            "general": fisher.main([*common, "--data_path", data_files["general"], "--output_dir", str(out)]),
            "domain": fisher.main([*common, "--data_path", data_files["chem"], "--output_dir", str(out)]),
            "alignment": gradient.main([*common, "--general_data_path", data_files["general"],
                                        "--domain_data_path", data_files["chem"], "--output_dir", str(out)]),
        }
    return files


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def hooked_inputs(model, names, embedder, texts, batch_size=2) -> dict:
    """Each named linear layer's inputs at the real tokens, sides and texts in order, from one plain forward pass
    per batch of ``texts`` (side -> texts)."""
    import torch

    seen = {name: [] for name in names}
    current = {}
    handles = [model.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0][current["real"]].float())) for name in names]
    with torch.no_grad():
        for side_texts in texts.values():
            for start in range(0, len(side_texts), batch_size):
                tokens = embedder.tokenize(side_texts[start:start + batch_size])
                current["real"] = tokens["attention_mask"].bool()
                model(**tokens)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(inputs) for name, inputs in seen.items()}


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def published_layout(json_path: str, folder) -> str:
    """A copy of a fisher.py/gradient.py result in ``folder`` in the published code's layout: the JSON
    without ``tensor_file`` beside a folder of float16 ``.npy`` files, one per parameter."""
    data = json.load(open(json_path))
    tensor_file = os.path.join(os.path.dirname(json_path), data["metadata"].pop("tensor_file"))
    base = os.path.basename(os.path.splitext(json_path)[0])
    alignment = "alignment_scores" in data
    arrays = folder / ((base.replace("alignment_scores_", "alignment_elementwise_") if alignment else base) + "_tensors")
    arrays.mkdir(parents=True)
    with safe_open(tensor_file, framework="np") as handle:
        for name in handle.keys():
            np.save(arrays / f"{name}.npy", handle.get_tensor(name).astype(np.float16))
    if alignment:
        data["metadata"].pop("parameter_shapes")
    target = str(folder / os.path.basename(json_path))
    json.dump(data, open(target, "w"))
    return target


def fail(capsys, main, argv) -> str:
    """Run a script's main through the CLI edge and return its one error line: a non-zero exit, no traceback,
    nothing else on stderr but logged warnings and progress bars."""
    from gaprune.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line
             and "Writing model shards" not in line and " WARNING " not in line and "%|" not in line]  # tqdm bars
    assert exit_info.value.code not in (0, None)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def no_temporaries(folder) -> bool:
    return not any(".tmp-" in name or ".old-" in name or name.endswith(".claimed")
                   for _, dirs, files in os.walk(folder) for name in dirs + files)
