"""The C Winograd transforms: built once per machine with the system's compiler, or not at all."""

import shutil

import pytest

from stylekit import native_transforms


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Every test builds into its own cache, and tries the build afresh."""
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    native_transforms.transforms.cache_clear()
    yield
    native_transforms.transforms.cache_clear()


def _compiler() -> str:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler here")
    return compiler


def test_the_library_is_built_into_the_cache_and_loaded_with_both_transforms(tmp_path):
    _compiler()
    library = native_transforms.transforms()
    assert library is not None
    assert library.winograd_input and library.winograd_output
    assert len(list((tmp_path / "native").glob("winograd-*"))) == 1


def test_a_cached_library_is_loaded_without_compiling_again(monkeypatch):
    compiler = _compiler()
    first = native_transforms.built(compiler, ("-O3",))
    monkeypatch.setattr(native_transforms.subprocess, "run", pytest.fail)
    assert native_transforms.built(compiler, ("-O3",)) == first


def test_other_flags_or_another_compiler_build_their_own_library():
    compiler = _compiler()
    assert native_transforms.built(compiler, ("-O3",)) != native_transforms.built(compiler, ("-O2",))


def test_a_damaged_cached_library_is_built_again():
    compiler = _compiler()
    path = native_transforms.built(compiler, native_transforms.FLAG_SETS[-1])
    path.write_bytes(b"cut short")
    assert native_transforms._loaded(path, compiler, native_transforms.FLAG_SETS[-1]) is not None
    assert path.stat().st_size > len(b"cut short")


def test_without_a_compiler_there_is_no_library(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    assert native_transforms.transforms() is None


def test_a_compiler_that_fails_leaves_no_library_and_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", shutil.which("false") or pytest.skip("no false(1) here"))
    assert native_transforms.transforms() is None
    assert not list((tmp_path / "native").iterdir())


def test_stylekit_native_0_turns_the_c_transforms_off(monkeypatch, tmp_path):
    _compiler()
    monkeypatch.setenv(native_transforms.SWITCH, "0")
    assert native_transforms.transforms() is None
    assert not (tmp_path / "native").exists()


def test_where_torch_runs_gnu_openmp_each_flag_set_is_tried_with_openmp_first(monkeypatch):
    monkeypatch.setattr(native_transforms, "runs_libgomp", lambda: True)
    sets = native_transforms.flag_sets()
    assert sets[0::2] == [flags + native_transforms.OPENMP for flags in native_transforms.FLAG_SETS]
    assert sets[1::2] == list(native_transforms.FLAG_SETS)


def test_without_gnu_openmp_in_the_process_the_library_is_built_without_it(monkeypatch):
    monkeypatch.setattr(native_transforms, "runs_libgomp", lambda: False)
    assert native_transforms.flag_sets() == list(native_transforms.FLAG_SETS)


def _mapped_libgomps() -> set[str]:
    with open("/proc/self/maps") as handle:
        return {line.split()[-1] for line in handle if "libgomp" in line}


def test_the_openmp_build_shares_torchs_libgomp_instead_of_loading_a_second_runtime():
    if not native_transforms.runs_libgomp():
        pytest.skip("torch here does not run on GNU OpenMP")
    compiler = _compiler()
    before = _mapped_libgomps()
    flags = native_transforms.FLAG_SETS[-1] + native_transforms.OPENMP
    try:
        native_transforms._loaded(native_transforms.built(compiler, flags), compiler, flags)
    except (OSError, native_transforms.subprocess.SubprocessError):
        pytest.skip("this compiler has no OpenMP")
    assert _mapped_libgomps() == before and len(before) == 1
