"""The data set registry and the resolution of names, directories and mappings to splits."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data.datasets import (
    DRIVE_URL,
    PECOS_URL,
    REGISTRY,
    DatasetInfo,
    dataset_rows,
    dataset_status,
    find_layout,
    format_dataset_rows,
    load_dataset,
)
from xmlsparse.data.formats import write_npz_pair, write_xc_text
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError

TRAIN = XMCData(
    X=sp.csr_matrix(np.array([[1, 0, 0, 0.5], [0, 0.25, 0, 0], [0, 0, 1, 0]], np.float32)),
    Y=sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1]], np.float32)),
    n_features=4,
    n_labels=3,
)
TEST = XMCData(
    X=sp.csr_matrix(np.array([[0, 1, 0, 0], [0.5, 0, 0, 1]], np.float32)),
    Y=sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 1]], np.float32)),
    n_features=4,
    n_labels=3,
)


def assert_same(data: XMCData, expected: XMCData, dense_x: np.ndarray | None = None) -> None:
    X = data.X if isinstance(data.X, np.ndarray) else data.X.toarray()
    np.testing.assert_allclose(X, expected.X.toarray() if dense_x is None else dense_x)
    np.testing.assert_array_equal(data.Y.toarray(), expected.Y.toarray())
    assert data.n_labels == expected.n_labels


def write_npz_layout(directory: Path, meta: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_npz_pair(directory / "X.trn.npz", directory / "Y.trn.npz", TRAIN)
    write_npz_pair(directory / "X.tst.npz", directory / "Y.tst.npz", TEST)
    if meta is not None:
        (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def write_text_lines(path: Path, header: str, rows) -> None:
    lines = [" ".join(f"{j}:{v:g}" for j, v in zip(row.indices, row.data)) for row in rows]
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------
# Registry

PUBLISHED = {
    # name: D, L, N train, N test, labels/point, A, B (SOURCES.md)
    "eurlex-4k": (5_000, 3_993, 15_539, 3_809, 5.31, 0.55, 1.5),
    "wiki10-31k": (101_938, 30_938, 14_146, 6_616, 18.64, 0.55, 1.5),
    "amazoncat-13k": (203_882, 13_330, 1_186_239, 306_782, 5.04, 0.55, 1.5),
    "amazon-670k": (135_909, 670_091, 490_449, 153_025, 5.45, 0.6, 2.6),
    "wiki-500k": (2_381_304, 501_070, 1_813_391, 783_743, 4.77, 0.5, 0.4),
    "amazon-3m": (337_067, 2_812_281, 1_717_899, 742_507, 36.17, 0.6, 2.6),
    "lf-amazontitles-131k": (40_000, 131_073, 294_805, 134_835, 2.29, 0.6, 2.6),
}

DRIVE_BOW = {
    "eurlex-4k": ("1xWW1UykQBTD2IorVn7V8XubJatQDScol", "Eurlex", "eurlex_train.txt", "eurlex_test.txt"),
    "wiki10-31k": ("1uV-p682ggXQQTiKZyK5M6B0xJJk8_lJx", "Wiki10", "wiki10_train.txt", "wiki10_test.txt"),
    "amazoncat-13k": ("1WvBWF9hH5ZlFcpCRhp8wLVGwdeGZXKD2", "AmazonCat", "amazonCat_train.txt", "amazonCat_test.txt"),
    "amazon-670k": ("1PV-wbKVv6Ng1K1XM1USqNxFhaQo2qfk6", "Amazon", "amazon_train.txt", "amazon_test.txt"),
    "wiki-500k": (
        "1LkGdINF5coOfkm6J2xys3V1NMW7zz8U1",
        "WikipediaLarge-500K",
        "WikipediaLarge-500K_train.txt",
        "WikipediaLarge-500K_test.txt",
    ),
    "amazon-3m": ("1ork7yeAcliD9JQiRdEx4QknhMFHjVrku", "Amazon-3M", "amazon-3M_train.txt", "amazon-3M_test.txt"),
    "lf-amazontitles-131k": ("1VlfcdJKJA99223fLEawRmrXhXpwjwJKn", "LF-AmazonTitles-131K", "train.txt", "test.txt"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_holds_the_published_shapes(name):
    info = REGISTRY[name]
    assert info.name == name
    got = (
        info.n_features, info.n_labels, info.n_train, info.n_test, info.labels_per_point,
        info.propensity_a, info.propensity_b,
    )
    assert got == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_mirrors_pecos_first_then_drive(name):
    info = REGISTRY[name]
    bow = info.mirrors_for("bow")
    drive_id, folder, train, test = DRIVE_BOW[name]
    if name == "lf-amazontitles-131k":  # not on the PECOS mirror
        assert len(bow) == 1
    else:
        pecos = bow[0]
        assert pecos.url == PECOS_URL.format(name=name)
        assert pecos.url == f"https://archive.org/download/pecos-dataset/xmc-base/{name}.tar.gz"
        assert pecos.archive == "tar.gz" and pecos.layout.folder == f"xmc-base/{name}"
        assert pecos.layout.train == ("tfidf-attnxml/X.trn.npz", "Y.trn.npz")
        assert pecos.layout.test == ("tfidf-attnxml/X.tst.npz", "Y.tst.npz")
    drive = bow[-1]
    assert drive.url == f"https://drive.google.com/uc?export=download&id={drive_id}" == DRIVE_URL.format(id=drive_id)
    assert (drive.archive, drive.layout.folder, drive.layout.format) == ("zip", folder, "xc-text")
    assert (drive.layout.train, drive.layout.test) == ((train,), (test,))


def test_amazon_670k_has_a_raw_text_mirror():
    (raw,) = REGISTRY["amazon-670k"].mirrors_for("raw")
    assert raw.url.endswith("id=1WAzs7qfLY8ZoluHbY55WyakhibW27kS2")
    assert raw.layout.folder == "Amazon-670K.raw" and raw.layout.format == "raw-json"
    assert (raw.layout.train, raw.layout.test) == (("trn.raw.json.gz",), ("tst.raw.json.gz",))


def test_dataset_info_is_frozen():
    with pytest.raises(AttributeError):
        REGISTRY["eurlex-4k"].n_labels = 1


# ---------------------------------------------------------------------------------------------------
# Registry names


def test_missing_registry_set_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(XMLSparseError) as caught:
        load_dataset("amazon-670k")
    message = str(caught.value)
    assert "xmlsparse download-dataset amazon-670k" in message and "data/amazon-670k" in message
    assert "--root" not in message
    with pytest.raises(XMLSparseError, match="xmlsparse download-dataset eurlex-4k --root elsewhere"):
        load_dataset("eurlex-4k", root=Path("elsewhere"))


def test_installed_registry_set_loads_with_the_registry_info(tmp_path):
    assert dataset_status("eurlex-4k", tmp_path) == "missing"
    write_npz_layout(tmp_path / "eurlex-4k", {"name": "eurlex-4k", "propensity_a": 0.55, "propensity_b": 1.5})
    assert dataset_status("eurlex-4k", tmp_path) == "present"
    train, test, info = load_dataset("eurlex-4k", root=tmp_path)
    assert_same(train, TRAIN)
    assert_same(test, TEST)
    assert info is REGISTRY["eurlex-4k"]


def test_dense_features_of_a_registry_set_come_from_the_raw_folder(tmp_path):
    raw = tmp_path / "amazon-670k-raw"
    raw.mkdir()
    for split, data in (("trn", TRAIN), ("tst", TEST)):
        sp.save_npz(raw / f"Y.{split}.npz", data.Y)
        np.save(raw / f"X.{split}.npy", np.full((data.n_points, 2), 0.5, np.float32))
    train, test, info = load_dataset("amazon-670k", root=tmp_path, features="dense")
    assert isinstance(train.X, np.ndarray) and train.X.shape == (3, 2) and test.X.shape == (2, 2)
    np.testing.assert_array_equal(test.Y.toarray(), TEST.Y.toarray())
    assert info is REGISTRY["amazon-670k"]
    with pytest.raises(XMLSparseError, match="xmlsparse download-dataset wiki-500k --root .* --variant raw"):
        load_dataset("wiki-500k", root=tmp_path, features="dense")


def test_unknown_name_lists_the_registry(tmp_path):
    with pytest.raises(XMLSparseError, match="'nope' is neither a registry name .*eurlex-4k.* nor a directory"):
        load_dataset("nope", root=tmp_path)
    with pytest.raises(XMLSparseError, match="features 'tfidf'"):
        load_dataset("eurlex-4k", root=tmp_path, features="tfidf")


# ---------------------------------------------------------------------------------------------------
# Directory layouts


def test_npz_folder_with_meta_gives_its_name_and_propensity(tmp_path):
    directory = write_npz_layout(tmp_path / "synthetic", {"name": "synthetic-quickstart", "A": 0.5, "B": 0.4})
    train, test, info = load_dataset(directory)
    assert_same(train, TRAIN)
    assert_same(test, TEST)
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.propensity_a, info.propensity_b) == ("synthetic-quickstart", 0.5, 0.4)
    assert (info.n_train, info.n_test, info.n_features, info.n_labels) == (3, 2, 4, 3)
    assert info.labels_per_point == pytest.approx(4 / 3, abs=0.01)


def test_folder_under_root_is_found_by_name_and_meta_keys_of_the_generator_are_read(tmp_path):
    write_npz_layout(tmp_path / "quickstart", {"name": "synthetic", "propensity_a": 0.6, "propensity_b": 2.6})
    _, _, info = load_dataset("quickstart", root=tmp_path)
    assert (info.name, info.propensity_a, info.propensity_b) == ("synthetic", 0.6, 2.6)


def test_folder_without_meta_has_no_info(tmp_path):
    _, _, info = load_dataset(write_npz_layout(tmp_path / "plain"))
    assert info is None


def test_meta_with_a_bad_value_names_the_key(tmp_path):
    directory = write_npz_layout(tmp_path / "bad", {"name": "x", "A": "high"})
    with pytest.raises(XMLSparseError, match=r"meta.json: key 'A' is 'high', expected a number"):
        load_dataset(directory)
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(XMLSparseError, match="meta.json: not valid JSON"):
        load_dataset(directory)


def test_pecos_xmc_base_folder(tmp_path):
    directory = tmp_path / "xmc-base" / "eurlex-4k"
    (directory / "tfidf-attnxml").mkdir(parents=True)
    for split, data in (("trn", TRAIN), ("tst", TEST)):
        write_npz_pair(directory / "tfidf-attnxml" / f"X.{split}.npz", directory / f"Y.{split}.npz", data)
    (directory / "X.trn.txt").write_text("raw text\n" * 3)
    assert find_layout(directory).train[0] == directory / "tfidf-attnxml" / "X.trn.npz"
    train, test, _ = load_dataset(directory)
    assert_same(train, TRAIN)
    assert_same(test, TEST)


@pytest.mark.parametrize("names", [("train.txt", "test.txt"), ("eurlex_train.txt", "eurlex_test.txt")])
def test_xc_text_folder(tmp_path, names):
    write_xc_text(tmp_path / names[0], TRAIN)
    write_xc_text(tmp_path / names[1], TEST)
    train, test, _ = load_dataset(tmp_path)
    assert_same(train, TRAIN)
    assert_same(test, TEST)


def test_split_format_folder(tmp_path):
    for prefix, data in (("trn", TRAIN), ("tst", TEST)):
        write_text_lines(tmp_path / f"{prefix}_X_Xf.txt", f"{data.n_points} {data.n_features}", data.X)
        write_text_lines(tmp_path / f"{prefix}_X_Y.txt", f"{data.n_points} {data.n_labels}", data.Y)
    train, test, _ = load_dataset(tmp_path)
    assert_same(train, TRAIN)
    assert_same(test, TEST)


def test_attentionxml_folder_shares_labels_and_vocabulary(tmp_path):
    (tmp_path / "train_texts.txt").write_text("red apple\ngreen pear\nred pear\n")
    (tmp_path / "train_labels.txt").write_text("fruit red\nfruit\nfruit red\n")
    (tmp_path / "test_texts.txt").write_text("green apple\n")
    (tmp_path / "test_labels.txt").write_text("red\n")
    train, test, _ = load_dataset(tmp_path)
    assert train.n_points == 3 and test.n_points == 1
    assert train.n_features == test.n_features and train.n_labels == test.n_labels == 2
    np.testing.assert_array_equal(test.Y.toarray(), [[0, 1]])  # "red" got id 1 in train


def test_incomplete_folder_names_what_is_missing(tmp_path):
    write_xc_text(tmp_path / "train.txt", TRAIN)
    with pytest.raises(XMLSparseError, match="has train.txt but lacks test.txt"):
        load_dataset(tmp_path)


def test_empty_folder_lists_the_layouts(tmp_path):
    with pytest.raises(XMLSparseError, match="no data set layout found; expected one of X.trn.npz"):
        load_dataset(tmp_path)


def test_two_candidate_split_files_are_ambiguous(tmp_path):
    for name in ("a_train.txt", "b_train.txt", "a_test.txt"):
        write_xc_text(tmp_path / name, TRAIN)
    with pytest.raises(XMLSparseError, match="several candidate split files .*a_train.txt, b_train.txt"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Dense features


def test_dense_features_pair_with_npz_labels(tmp_path):
    features = {"trn": np.arange(6, dtype=np.float32).reshape(3, 2), "tst": np.ones((2, 2), np.float32)}
    for split, data in (("trn", TRAIN), ("tst", TEST)):
        np.save(tmp_path / f"X.{split}.npy", features[split])
        sp.save_npz(tmp_path / f"Y.{split}.npz", data.Y)
    train, test, _ = load_dataset(tmp_path, features="dense")
    assert_same(train, TRAIN, dense_x=features["trn"])
    assert_same(test, TEST, dense_x=features["tst"])
    assert train.n_features == 2
    with pytest.raises(XMLSparseError, match="holds dense features X.trn.npy but no BoW features; set features"):
        load_dataset(tmp_path)


def test_dense_features_pair_with_text_labels(tmp_path):
    write_xc_text(tmp_path / "train.txt", TRAIN)
    write_xc_text(tmp_path / "test.txt", TEST)
    np.save(tmp_path / "X.trn.npy", np.ones((3, 5), np.float32))
    with pytest.raises(XMLSparseError, match="expects X.tst.npy, which is missing"):
        load_dataset(tmp_path, features="dense")
    np.save(tmp_path / "X.tst.npy", np.ones((4, 5), np.float32))  # one row per test point is 2, not 4
    with pytest.raises(XMLSparseError, match="X.tst.npy has 4 rows but .*test.txt has 2"):
        load_dataset(tmp_path, features="dense")
    np.save(tmp_path / "X.tst.npy", np.ones((2, 5), np.float32))
    train, test, _ = load_dataset(tmp_path, features="dense")
    assert train.X.shape == (3, 5) and test.X.shape == (2, 5)
    np.testing.assert_array_equal(train.Y.toarray(), TRAIN.Y.toarray())


# ---------------------------------------------------------------------------------------------------
# Test splits that do not fit the training split


def xc_folder(folder: Path, test_text: str) -> Path:
    write_xc_text(folder / "train.txt", TRAIN)  # 3 points, 4 features, 3 labels
    (folder / "test.txt").write_text(test_text)
    return folder


def npz_folder_with_wide_test_features(folder: Path) -> Path:
    write_npz_layout(folder)
    wide = sp.csr_matrix(([1.0, 1.0], ([0, 1], [1, 5])), shape=(2, 6), dtype=np.float32)
    sp.save_npz(folder / "X.tst.npz", wide)
    return folder


def split_text_folder_with_more_test_labels(folder: Path) -> Path:
    for prefix, data in (("trn", TRAIN), ("tst", TEST)):
        write_text_lines(folder / f"{prefix}_X_Xf.txt", f"{data.n_points} {data.n_features}", data.X)
    write_text_lines(folder / "trn_X_Y.txt", "3 3", TRAIN.Y)
    (folder / "tst_X_Y.txt").write_text("2 5\n0:1\n4:1\n")
    return folder


def dense_folder_with_wider_test_rows(folder: Path) -> Path:
    for split, data, width in (("trn", TRAIN, 2), ("tst", TEST, 3)):
        sp.save_npz(folder / f"Y.{split}.npz", data.Y)
        np.save(folder / f"X.{split}.npy", np.ones((data.n_points, width), np.float32))
    return folder


def mapping_with_more_test_labels(folder: Path) -> dict:
    write_xc_text(folder / "a.txt", TRAIN)
    (folder / "b.txt").write_text("2 4 4\n3 1:1\n0 2:1\n")
    return {"train": str(folder / "a.txt"), "test": str(folder / "b.txt")}


@pytest.mark.parametrize(
    "make, features, expected",
    [
        (
            lambda d: xc_folder(d, "2 6 3\n1 1:1\n0 5:1\n"),
            "bow",
            "test.txt: the test split has 6 features but the training split ({d}/train.txt) has 4, "
            "and line 3 uses feature id 5; expected feature ids below 4",
        ),
        (
            lambda d: xc_folder(d, "2 4 5\n1 1:1\n4 2:1\n"),
            "bow",
            "test.txt: the test split has 5 labels but the training split ({d}/train.txt) has 3, "
            "and line 3 uses label id 4; expected label ids below 3",
        ),
        (
            npz_folder_with_wide_test_features,
            "bow",
            "X.tst.npz: the test split has 6 features but the training split ({d}/X.trn.npz) has 4, "
            "and row 1 (counting from 0) uses feature id 5; expected feature ids below 4",
        ),
        (
            split_text_folder_with_more_test_labels,
            "bow",
            "tst_X_Y.txt: the test split has 5 labels but the training split ({d}/trn_X_Y.txt) has 3, "
            "and line 3 uses label id 4",
        ),
        (
            dense_folder_with_wider_test_rows,
            "dense",
            "X.tst.npy: test feature rows have 3 columns but the training rows ({d}/X.trn.npy) have 2; "
            "expected the same width",
        ),
        (
            mapping_with_more_test_labels,
            "bow",
            "b.txt: the test split has 4 labels but the training split ({d}/a.txt) has 3, and line 2 uses label id 3",
        ),
    ],
    ids=["xc-features", "xc-labels", "npz-features", "split-text-labels", "dense-width", "mapping-labels"],
)
def test_test_split_beyond_the_training_split(tmp_path, make, features, expected):
    spec = make(tmp_path)
    with pytest.raises(XMLSparseError) as caught:
        load_dataset(spec, features=features)
    message = str(caught.value)
    assert message.startswith(str(tmp_path)) and "\n" not in message
    assert expected.format(d=tmp_path) in message


@pytest.mark.parametrize(
    "test_text, warnings",
    [
        ("2 3 3\n1 1:1\n0 2:1\n", ["declares 3 features and the training split .* 4; its feature ids all lie below 4"]),
        ("2 9 3\n1 1:1\n0 3:1\n", ["declares 9 features and the training split .* 4; its feature ids all lie below 4"]),
        (
            "2 2 2\n1 1:1\n0 0:1\n",
            ["declares 2 features .* 4; its feature ids", "declares 2 labels .* 3; its label ids all lie below 3"],
        ),
    ],
    ids=["fewer-features", "more-features-whose-ids-fit", "fewer-features-and-labels"],
)
def test_test_split_whose_ids_fit_takes_the_training_shape(tmp_path, test_text, warnings):
    with pytest.warns(UserWarning) as caught:
        train, test, _ = load_dataset(xc_folder(tmp_path, test_text))
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(warnings)
    for message, pattern in zip(messages, warnings):
        assert message.startswith(str(tmp_path / "test.txt") + ": the test split ")
        assert re.search(pattern, message), message
    assert (test.n_features, test.n_labels) == (train.n_features, train.n_labels) == (4, 3)
    assert test.X.shape == (2, 4) and test.Y.shape == (2, 3)
    assert test.X.nnz == 2 and test.Y.nnz == 2 and test.Y[0].indices.tolist() == [1]  # nothing dropped


# ---------------------------------------------------------------------------------------------------
# Mappings


def test_mapping_of_paths(tmp_path):
    write_xc_text(tmp_path / "a.txt", TRAIN)
    write_xc_text(tmp_path / "b.txt", TEST)
    train, test, info = load_dataset({"train": str(tmp_path / "a.txt"), "test": tmp_path / "b.txt"})
    assert_same(train, TRAIN)
    assert_same(test, TEST)
    assert info is None
    np.save(tmp_path / "a.npy", np.ones((3, 7), np.float32))
    np.save(tmp_path / "b.npy", np.ones((2, 7), np.float32))
    spec = {"train": tmp_path / "a.txt", "test": tmp_path / "b.txt", "train_features": tmp_path / "a.npy",
            "test_features": tmp_path / "b.npy"}
    train, test, _ = load_dataset(spec, features="dense")
    assert train.X.shape == (3, 7) and test.n_features == 7


def test_mapping_errors_name_the_key(tmp_path):
    write_xc_text(tmp_path / "a.txt", TRAIN)
    with pytest.raises(XMLSparseError, match="unknown key 'valid'"):
        load_dataset({"train": tmp_path / "a.txt", "test": tmp_path / "a.txt", "valid": tmp_path / "a.txt"})
    with pytest.raises(XMLSparseError, match="key 'test' is missing"):
        load_dataset({"train": tmp_path / "a.txt"})
    with pytest.raises(XMLSparseError, match="key 'train_features' is missing"):
        load_dataset({"train": tmp_path / "a.txt", "test": tmp_path / "a.txt"}, features="dense")
    with pytest.raises(XMLSparseError, match="key 'test': .*nothing.txt does not exist"):
        load_dataset({"train": tmp_path / "a.txt", "test": tmp_path / "nothing.txt"})
    with pytest.raises(XMLSparseError, match="features is 'bow'"):
        load_dataset({"train": tmp_path / "a.txt", "test": tmp_path / "a.txt", "train_features": tmp_path / "a.txt"})


# ---------------------------------------------------------------------------------------------------
# Listing


def test_dataset_rows_and_table(tmp_path):
    write_npz_layout(tmp_path / "wiki10-31k")
    rows = {row["name"]: row for row in dataset_rows(tmp_path)}
    assert set(rows) == set(REGISTRY)
    assert rows["wiki10-31k"]["status"] == "present" and rows["amazon-3m"]["status"] == "missing"
    assert (rows["amazon-670k"]["n_train"], rows["amazon-670k"]["propensity_b"]) == (490_449, 2.6)
    table = format_dataset_rows(list(rows.values())).splitlines()
    assert table[0].split() == ["name", "train", "test", "features", "labels", "labels/point", "A", "B", "status"]
    amazon = next(line for line in table if line.startswith("amazon-670k "))
    expected = ["amazon-670k", "490,449", "153,025", "135,909", "670,091", "5.45", "0.6", "2.6", "missing"]
    assert amazon.split() == expected
    assert len({len(line.rstrip()) - len(line.split()[-1]) for line in table}) == 1  # status column aligned


# ---------------------------------------------------------------------------------------------------
# The real small data sets beside the repository


@pytest.mark.parametrize("name, shape", [("bibtex", (4880, 2515, 1836, 159)), ("delicious", (12920, 3185, 500, 983))])
def test_real_xc_text_sets(shared_datasets, name, shape):
    train, test, info = load_dataset(shared_datasets / name)
    assert (train.n_points, test.n_points, train.n_features, train.n_labels) == shape
    assert test.n_labels == train.n_labels and info is None


@pytest.mark.filterwarnings("ignore:.*label occurrences not in the training label map")
def test_real_attentionxml_sample(shared_datasets):
    train, test, _ = load_dataset(shared_datasets / "amazon-670k-sample")
    assert train.n_points == 200 and test.n_points == 200
    assert train.n_features == test.n_features and train.Y.nnz > 0
