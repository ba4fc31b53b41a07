"""The colbert-ai surface that colbert_patches relies on, checked by name.

Every module, class, attribute, private helper and signature the patches
touch is looked up here without loading a model, so an upgrade of colbert-ai
fails in seconds, naming what moved, rather than deep in a slow test (or, for
``quiet``, silently). ``apply()`` refuses any release but the supported one;
the checks below are what to run when moving to another.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

import colbert_patches
from colbert_patches import codec as codec_patch
from colbert_patches import quiet as quiet_patch
from colbert_patches import scorer as scorer_patch
from colbert_patches import tokenization as tokenization_patch

ROOT = Path(__file__).resolve().parents[2]


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def source_tree(obj) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(obj)))


def self_attributes(obj, *, assigned: bool) -> set[str]:
    """``self.<name>`` assigned (or read) in the source of ``obj``."""
    names = set()
    for node in ast.walk(source_tree(obj)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            if isinstance(node.ctx, ast.Store) == assigned:
                names.add(node.attr)
    return names


def upstream_def(module: str, *names: str) -> ast.FunctionDef | ast.ClassDef:
    """A definition as colbert-ai's file has it: the names apply() replaces
    (``print_message``, ``class_factory``, ``compress_into_codes``) are read
    from source, since another test may have applied the patches already."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    body = ast.parse(Path(spec.origin).read_text()).body
    found = None
    for name in names:
        (found,) = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        body = found.body
    assert found is not None
    return found


def def_params(node) -> list[str]:
    a = node.args
    return [x.arg for x in [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs]]


def config_fields_read(*objs) -> set[str]:
    """``config.<name>`` read in the source of ``objs`` (functions that take a ``config``)."""
    return {name for obj in objs for name in re.findall(r"\bconfig\.(\w+)", inspect.getsource(obj))}


# -- the pin ------------------------------------------------------------------------------


def test_installed_colbert_is_the_supported_release_and_the_pin():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("colbert-ai")]
    assert pins == [f"colbert-ai=={colbert_patches.SUPPORTED_COLBERT_VERSION}"]
    assert importlib.metadata.version("colbert-ai") == colbert_patches.SUPPORTED_COLBERT_VERSION


@pytest.mark.parametrize("installed", ["0.2.21", "0.2.23", "1.0.0"])
def test_apply_refuses_another_colbert_release(monkeypatch, installed):
    seen = []

    def version(name):
        seen.append(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(colbert_patches, "_applied", False)
    with pytest.raises(RuntimeError) as raised:
        colbert_patches.apply()
    message = str(raised.value)
    assert seen == ["colbert-ai"]
    assert f"colbert-ai {installed} is installed" in message
    assert f"colbert-ai=={colbert_patches.SUPPORTED_COLBERT_VERSION}" in message
    assert "pip install" in message and "SUPPORTED_COLBERT_VERSION" in message  # what to do
    assert colbert_patches._applied is False


def test_apply_refuses_when_colbert_is_not_installed(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(colbert_patches, "_applied", False)
    with pytest.raises(RuntimeError, match="colbert-ai is not installed"):
        colbert_patches.apply()


def test_apply_accepts_the_supported_release():
    colbert_patches.check_colbert_version()
    colbert_patches.apply()  # idempotent: a second call is a no-op
    colbert_patches.apply()


# -- quiet.py -------------------------------------------------------------------------------


def test_quiet_names():
    import colbert.utils.utils as utils

    # The replacement takes what upstream's takes: *parts, condition, pad.
    assert def_params(upstream_def("colbert.utils.utils", "print_message")) == ["s", "condition", "pad"]
    assert params(quiet_patch._print_message) == ["parts", "condition", "pad"]
    assert callable(utils.print_message)
    # The modules quiet.apply() imports before it walks sys.modules.
    for name in (
        "colbert.indexing.codecs.residual",
        "colbert.modeling.checkpoint",
        "colbert.search.index_loader",
        "colbert.search.index_storage",
    ):
        importlib.import_module(name)
    # Modules that print bind print_message by name, so the walk can replace it.
    for name in ("colbert.search.index_loader", "colbert.search.index_storage", "colbert.indexing.codecs.residual"):
        assert getattr(importlib.import_module(name), "print_message", None) is not None, name
    # tqdm is imported as the module or as the class: the two shapes quiet handles.
    package = Path(utils.__file__).parents[1]
    imports = set()
    for path in package.rglob("*.py"):
        imports |= set(re.findall(r"^\s*((?:from|import)\s+tqdm\b.*?)\s*$", path.read_text(errors="replace"), re.M))
    assert imports == {"import tqdm", "from tqdm import tqdm"}, imports


# -- model_loading.py -----------------------------------------------------------------------

CLASS_FACTORY_MODULES = {
    "colbert.modeling.hf_colbert",
    "colbert.modeling.base_colbert",
    "colbert.modeling.tokenization.doc_tokenization",
    "colbert.modeling.tokenization.query_tokenization",
}


def test_class_factory_is_bound_only_where_model_loading_replaces_it():
    import colbert

    for name in CLASS_FACTORY_MODULES:
        module = importlib.import_module(name)
        assert callable(module.class_factory), name
    assert def_params(upstream_def("colbert.modeling.hf_colbert", "class_factory")) == ["name_or_path"]
    # A fifth module importing class_factory would keep the unpatched one.
    package = Path(colbert.__file__).parent
    users = set()
    for path in package.rglob("*.py"):
        if re.search(r"^\s*from\s+\S+\s+import\s+.*\bclass_factory\b", path.read_text(errors="replace"), re.M):
            users.add(".".join(("colbert", *path.relative_to(package).with_suffix("").parts)))
    assert users <= CLASS_FACTORY_MODULES, users - CLASS_FACTORY_MODULES


def test_hf_colbert_still_has_the_init_the_patch_fixes():
    factory = upstream_def("colbert.modeling.hf_colbert", "class_factory")
    (cls,) = [n for n in ast.walk(factory) if isinstance(n, ast.ClassDef)]
    assert cls.name == "HF_ColBERT"
    (init,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    assert [a.arg for a in init.args.args] == ["self", "config", "colbert_config"]
    assert "init_weights" in ast.unparse(init)  # what post_init() replaces (see model_loading)


def test_checkpoint_names():
    import transformers
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint
    from colbert.utils.amp import MixedPrecisionManager

    assert params(Checkpoint.__init__) == ["self", "name", "colbert_config", "verbose"]
    # load_checkpoint replaces these after construction: they must be what the constructor sets.
    assert {"query_tokenizer", "doc_tokenizer", "amp_manager"} <= self_attributes(Checkpoint.__init__, assigned=True)
    assert params(MixedPrecisionManager.__init__) == ["self", "activated"]
    assert callable(ColBERTConfig.from_existing) and callable(ColBERTConfig.load_from_checkpoint)
    assert params(ColBERTConfig.load_from_checkpoint) == ["checkpoint_path"]
    fields = {f.name for f in dataclasses.fields(ColBERTConfig)}
    used = {"checkpoint", "doc_maxlen", "query_maxlen", "dim", "nbits", "kmeans_niters", "gpus"}
    used |= {"attend_to_mask_tokens", "query_token_id", "doc_token_id", "interaction"}
    assert used <= fields, used - fields
    assert callable(transformers.utils.logging.disable_progress_bar)


# -- tokenization.py ------------------------------------------------------------------------


def test_tokenizer_names():
    from colbert.modeling.tokenization import utils
    from colbert.modeling.tokenization.doc_tokenization import DocTokenizer
    from colbert.modeling.tokenization.query_tokenization import QueryTokenizer

    assert params(utils._insert_prefix_token) == ["tensor", "prefix_id"]
    assert params(utils._sort_by_length) == ["ids", "mask", "bsize"]
    assert params(utils._split_into_batches) == ["ids", "mask", "bsize"]
    assert params(QueryTokenizer.__init__) == ["self", "config", "verbose"]
    assert params(DocTokenizer.__init__) == ["self", "config"]
    # The overrides keep upstream's signatures (Checkpoint calls them positionally).
    assert params(tokenization_patch.ServerQueryTokenizer.tensorize) == params(QueryTokenizer.tensorize)
    assert params(tokenization_patch.ServerDocTokenizer.tensorize) == params(DocTokenizer.tensorize)
    query = {"tok", "config", "query_maxlen", "Q_marker_token_id", "pad_token_id", "mask_token_id"}
    assert query <= self_attributes(QueryTokenizer.__init__, assigned=True)
    assert {"tok", "config", "doc_maxlen", "D_marker_token_id"} <= self_attributes(DocTokenizer.__init__, assigned=True)


# -- codec.py -------------------------------------------------------------------------------


def test_codec_names():
    import faiss
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.indexing.collection_indexer import CollectionIndexer

    upstream = upstream_def("colbert.indexing.codecs.residual", "ResidualCodec", "compress_into_codes")
    assert def_params(upstream) == params(codec_patch.compress_into_codes) == ["self", "embs", "out_device"]
    assert callable(ResidualCodec.compress_into_codes)
    upstream = upstream_def("colbert.indexing.codecs.residual", "ResidualCodec", "binarize")
    assert def_params(upstream) == params(codec_patch.binarize) == ["self", "residuals"]
    # The replacement reads these; the constructor must set them.
    assert {"centroids", "use_gpu", "dim", "nbits", "avg_residual", "bucket_cutoffs", "bucket_weights"} <= (
        self_attributes(ResidualCodec.__init__, assigned=True)
    )
    init = params(ResidualCodec.__init__)
    assert init == ["self", "config", "centroids", "avg_residual", "bucket_cutoffs", "bucket_weights"]
    # train_codec calls this private method with a SimpleNamespace(config, use_gpu, verbose) as self.
    assert params(CollectionIndexer._compute_avg_residual) == ["self", "centroids", "heldout"]
    assert self_attributes(CollectionIndexer._compute_avg_residual, assigned=False) <= {"config", "use_gpu", "verbose"}
    assert callable(faiss.Kmeans)


# -- scorer.py ------------------------------------------------------------------------------


def test_snapshot_scorer_sets_everything_index_loader_would():
    from colbert.search.index_loader import IndexLoader

    upstream = set()
    for name in ("__init__", "_load_codec", "_load_ivf", "_load_doclens", "_load_embeddings"):
        upstream |= self_attributes(getattr(IndexLoader, name), assigned=True)
    ours = self_attributes(scorer_patch.SnapshotScorer.__init__, assigned=True)
    assert upstream == {"index_path", "use_gpu", "load_index_with_mmap", "codec", "ivf", "doclens", "embeddings"}
    assert upstream <= ours, upstream - ours
    assert params(IndexLoader.__init__) == ["self", "index_path", "use_gpu", "load_index_with_mmap"]


def test_index_scorer_names():
    from colbert.search.index_storage import IndexScorer

    assert params(IndexScorer.rank) == ["self", "config", "Q", "filter_fn", "pids"]
    assert params(IndexScorer.try_load_torch_extensions) == ["use_gpu"]
    # SnapshotScorer overrides both; upstream's rank reaches its scoring through score_pids.
    assert params(IndexScorer.set_embeddings_strided) == ["self"]
    assert params(IndexScorer.score_pids) == ["self", "config", "Q", "pids", "centroid_scores"]
    assert "score_pids" in self_attributes(IndexScorer.rank, assigned=False)


def test_search_params_cover_every_config_field_ranking_reads():
    from colbert.modeling import colbert as modeling
    from colbert.search.candidate_generation import CandidateGeneration
    from colbert.search.index_storage import IndexScorer

    read = config_fields_read(
        IndexScorer,
        CandidateGeneration,
        modeling.colbert_score,
        modeling.colbert_score_packed,
        modeling.colbert_score_reduce,
    )
    fields = {f.name for f in dataclasses.fields(scorer_patch.SearchParams)}
    assert {"ncells", "ndocs", "centroid_score_threshold", "query_maxlen"} <= read
    assert read <= fields, f"IndexScorer.rank reads config fields SearchParams lacks: {read - fields}"


def test_kernel_and_tensor_names():
    from colbert.indexing.codecs.residual_embeddings import ResidualEmbeddings
    from colbert.modeling.colbert import ColBERT, colbert_score_packed
    from colbert.search.index_storage import IndexScorer
    from colbert.search.strided_tensor import StridedTensor
    from colbert.search.strided_tensor_core import StridedTensorCore

    assert params(ResidualEmbeddings.__init__) == ["self", "codes", "residuals"]
    # segment_arrays pads each strided tensor by its longest row, so StridedTensor's own
    # padding (a copy of the whole tensor) never runs.
    assert "self.offsets[-2] + self.max_stride > self.tensor.size(0)" in inspect.getsource(StridedTensorCore.__init__)
    assert params(StridedTensor.__init__) == ["self", "packed_tensor", "lengths", "dim", "use_gpu"]
    assert params(colbert_score_packed) == ["Q", "D_packed", "D_lengths", "config"]
    # load_extensions sets, per class, the attributes try_load_torch_extensions would, from
    # <attribute>.cpp next to the class's module.
    kernels = {
        IndexScorer: {"filter_pids": "filter_pids_cpp", "decompress_residuals": "decompress_residuals_cpp"},
        ColBERT: {"segmented_maxsim": "segmented_maxsim_cpp"},
        StridedTensor: {"segmented_lookup": "segmented_lookup_cpp"},
    }
    for cls, names in kernels.items():
        assert params(cls.try_load_torch_extensions) == ["use_gpu"], cls
        source = inspect.getsource(cls.try_load_torch_extensions)
        assigned = self_attributes_of_cls(cls.try_load_torch_extensions)
        assert assigned == {*names, "loaded_extensions"}, (cls, assigned)
        folder = Path(inspect.getfile(cls)).parent
        for attr, ext in names.items():
            assert f'name="{ext}"' in source, (cls, ext)
            assert (folder / f"{attr}.cpp").is_file(), (cls, attr)


def self_attributes_of_cls(method) -> set[str]:
    """``cls.<name>`` assigned in a classmethod's source."""
    return {
        node.attr
        for node in ast.walk(source_tree(method))
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "cls"
    }


def test_kernel_build_folder_and_lock_are_upstreams(monkeypatch, tmp_path):
    """clear_stale_build_locks looks where torch builds and locks."""
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    for env in (None, str(tmp_path)):
        if env is None:
            monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env)
        expected = Path(cpp_extension._get_build_directory("filter_pids_cpp", verbose=False))
        assert scorer_patch._build_root() / "filter_pids_cpp" == expected
    source = inspect.getsource(cpp_extension._jit_compile)
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in source
    assert "def wait" in inspect.getsource(FileBaton)
