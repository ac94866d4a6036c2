"""benchmarks/gcide_triples.py on a hand-made dictionary in GCIDE's dictd format."""

import gzip
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gcide_triples", os.path.join(ROOT, "benchmarks", "gcide_triples.py"))
gcide = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gcide)

ENTRIES = [
    ("Benzene", 'Benzene \\Ben"zene\\, n. [From Benzoin.] (Chem.)\n'
                "   A volatile, very inflammable liquid, {C6H6}, contained in the\n"
                "   naphtha produced by the destructive distillation of coal.\n   [1913 Webster]\n"),
    ("Toluene", 'Toluene \\Tol"u*ene\\, n. (Chem.)\n'
                "   A hydrocarbon, {C6H5.CH3}, of the aromatic series, homologous\n"
                "   with benzene, obtained as a colorless liquid. --Watts.\n   [1913 Webster]\n"),
    ("Alkali", 'Alkali \\Al"ka*li\\, n. [F. alcali.]\n'
               "   1. Soda ash; caustic soda, caustic potash, etc.\n      [1913 Webster]\n\n"
               "   2. (Chem.) One of a class of caustic bases, such as soda, potash,\n"
               "      ammonia, and lithia, whose distinguishing peculiarities are\n"
               "      solubility in water.\n      [1913 Webster]\n"),
    ("Phenol", 'Phenol \\Phe"nol\\, n. (Chem.)\n'
               "   A white crystalline substance, {C6H5OH}, of the aromatic series, found in coal tar.\n"
               "   [1913 Webster]\n"),
    ("Oxide", 'Oxide \\Ox"ide\\, n. (Chem.)\n   See {Oxid}.\n   [1913 Webster]\n'),
    ("Harbor", 'Harbor \\Har"bor\\, n. [OE. herberwe.]\n'
               "   A place of security and comfort; a refuge; a shelter for ships in\n"
               "   stormy weather. \"Their harbor was the sea.\"\n   [1913 Webster]\n"),
    ("Haven", 'Haven \\Ha"ven\\, n.\n'
              "   A place of safety and shelter for ships, such as a sheltered bay or\n   inlet.\n   [1913 Webster]\n"),
    ("Mitten", 'Mitten \\Mit"ten\\, n.\n   A covering for the hand, worn to defend it from cold.\n   [1913 Webster]\n'),
    ("Lantern", 'Lantern \\Lan"tern\\, n.\n   Something inclosing a light, and protecting it from wind and rain.\n'
                "   [1913 Webster]\n"),
    ("Sepal", 'Sepal \\Se"pal\\, n. (Bot.)\n   A leaf or division of the calyx of a flower.\n   [1913 Webster]\n'),
]


def b64(number: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        number, digit = divmod(number, 64)
        digits = alphabet[digit] + digits
        if number == 0:
            return digits


@pytest.fixture
def dictionary(tmp_path):
    body, index = b"", []
    for headword, text in ENTRIES:
        data = text.encode()
        index.append(f"{headword}\t{b64(len(body))}\t{b64(len(data))}\n")
        body += data + b"\n"
    with gzip.open(tmp_path / "gcide.dict.dz", "wb") as handle:
        handle.write(body)
    (tmp_path / "gcide.index").write_text("".join(index))
    return str(tmp_path / "gcide.dict.dz")


def test_parses_chemistry_and_general_senses(dictionary):
    chem, general, counts = gcide.collect(gcide.read_entries(dictionary))
    assert chem == {
        "Benzene": "A volatile, very inflammable liquid, C6H6, contained in the naphtha produced by the "
                   "destructive distillation of coal.",
        "Toluene": "A hydrocarbon, C6H5.CH3, of the aromatic series, homologous with benzene, obtained as a "
                   "colorless liquid.",
        "Phenol": "A white crystalline substance, C6H5OH, of the aromatic series, found in coal tar.",
        "Alkali": "One of a class of caustic bases, such as soda, potash, ammonia, and lithia, whose "
                  "distinguishing peculiarities are solubility in water.",
    }  # Oxide's sense is only a pointer
    # Alkali has a chemistry sense, so it is not general; Sepal is labelled (Bot.)
    assert general == {
        "Harbor": "A place of security and comfort; a refuge; a shelter for ships in stormy weather.",
        "Haven": "A place of safety and shelter for ships, such as a sheltered bay or inlet.",
        "Mitten": "A covering for the hand, worn to defend it from cold.",
        "Lantern": "Something inclosing a light, and protecting it from wind and rain.",
    }
    assert counts["chem senses"] == 5


def test_writes_split_files_with_hard_negatives(dictionary, tmp_path):
    out = tmp_path / "out"
    assert gcide.main(["--dict_path", dictionary, "--output_dir", str(out), "--calibration_size", "2",
                       "--heldout_size", "2"]) == str(out)
    files = {name: json.load(open(out / f"{name}.json"))
             for name in ("chem-calibration", "chem-heldout", "general-calibration", "general-heldout")}
    assert [len(files[name]) for name in files] == [2, 2, 2, 2]
    for name, triples in files.items():
        prefix = gcide.PREFIXES[name.split("-")[0]]
        for triple in triples:
            assert triple["query"].startswith(prefix)
            assert triple["negative"] != triple["positive"]
    terms = {name: {t["query"].split("Query: ")[1] for t in triples} for name, triples in files.items()}
    assert not terms["chem-calibration"] & terms["chem-heldout"]
    assert not terms["general-calibration"] & terms["general-heldout"]
    # with two terms per split, the hard negative is the other term's definition
    for name in files:
        first, second = files[name]
        assert first["negative"] == second["positive"] and second["negative"] == first["positive"]
    assert json.load(open(out / "stats.json"))["files"]["chem-heldout.json"]["terms"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_hard_negative_is_the_most_similar_definition():
    items = [("Benzene", "a volatile aromatic liquid hydrocarbon from coal tar"),
             ("Toluene", "an aromatic liquid hydrocarbon homologous with benzene from coal tar"),
             ("Mitten", "a covering for the hand worn against cold")]
    triples = gcide.triples(items, "Q: ")
    assert triples[0]["negative"] == items[1][1] and triples[1]["negative"] == items[0][1]


def test_too_few_terms_is_an_error(dictionary, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gcide.main(["--dict_path", dictionary, "--output_dir", str(tmp_path / "out"), "--calibration_size", "3"])
    assert "too few for a calibration and a held-out split" in str(exit_info.value)
    assert not (tmp_path / "out").exists()


def test_missing_dictionary_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gcide.main(["--dict_path", str(tmp_path / "nope.dict.dz"), "--output_dir", str(tmp_path / "out")])
    assert "sudo apt-get install dict-gcide" in str(exit_info.value)
    assert not (tmp_path / "out").exists()
