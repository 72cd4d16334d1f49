"""`stylekit gimp install|uninstall`: where the plug-in goes, what its config says, what is printed."""

import json
import os
import py_compile
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stylekit.cli import main
from stylekit.gimp_install import gimp_dirs, server_command

SOURCE = Path(__file__).parents[1] / "plugins" / "gimp" / "stylekit"


def test_profile_folders_per_platform(tmp_path):
    home = tmp_path / "home"
    assert gimp_dirs({"GIMP3_DIRECTORY": "/x/gimp"}, "linux", home) == [Path("/x/gimp")]
    assert gimp_dirs({}, "linux", home) == [home / ".config" / "GIMP" / "3.0"]
    assert gimp_dirs({"XDG_CONFIG_HOME": "/cfg"}, "linux", home) == [Path("/cfg/GIMP/3.0")]
    assert gimp_dirs({}, "darwin", home) == [home / "Library" / "Application Support" / "GIMP" / "3.0"]
    assert gimp_dirs({"APPDATA": str(tmp_path / "roaming")}, "win32", home) == [
        tmp_path / "roaming" / "GIMP" / "3.0"]
    flatpak = home / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP" / "3.0"
    flatpak.mkdir(parents=True)
    assert gimp_dirs({}, "linux", home) == [flatpak]
    native = home / ".config" / "GIMP" / "3.2"
    native.mkdir(parents=True)
    assert gimp_dirs({}, "linux", home) == [native, flatpak]


def test_flatpak_gimp_starts_the_server_outside_its_sandbox(tmp_path):
    flatpak = tmp_path / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP" / "3.0"
    assert server_command("http://127.0.0.1:9000", flatpak)[:2] == ["flatpak-spawn", "--host"]
    native = server_command("http://127.0.0.1:9000", tmp_path / "GIMP" / "3.0")
    assert native[1:] == ["serve", "--port", "9000"] and Path(native[0]).name == "stylekit"


def test_install_then_uninstall(tmp_path, capsys):
    profile = tmp_path / "GIMP" / "3.0"
    profile.mkdir(parents=True)
    assert main(["gimp", "install", "--gimp-dir", str(profile), "--url", "http://127.0.0.1:9100/"]) == 0
    out = capsys.readouterr().out
    folder = profile / "plug-ins" / "stylekit"
    assert f"installed the GIMP plug-in in {folder}" in out and "serve --port 9100" in out
    assert "Filters ▸ Artistic ▸ Style Transfer" in out
    plugin = folder / "stylekit.py"
    assert plugin.read_bytes() == (SOURCE / "stylekit.py").read_bytes()
    assert (folder / "stylekit_client.py").read_bytes() == (SOURCE / "stylekit_client.py").read_bytes()
    assert os.access(plugin, os.X_OK)
    py_compile.compile(str(plugin), doraise=True)
    config = json.loads((folder / "stylekit-config.json").read_text())
    assert config["url"] == "http://127.0.0.1:9100" and config["command"][1:] == ["serve", "--port", "9100"]
    assert config["token"] == ""
    assert main(["gimp", "uninstall", "--gimp-dir", str(profile)]) == 0
    assert f"removed {folder}" in capsys.readouterr().out and not folder.exists()
    assert main(["gimp", "uninstall", "--gimp-dir", str(profile)]) == 0
    assert "nothing removed" in capsys.readouterr().out


def test_install_before_gimp_ever_ran_is_refused_so_gimp_still_imports_its_old_settings(
        tmp_path, capsys, monkeypatch):
    # GIMP 3 runs its first-start set-up (importing GIMP 2.10's settings) only when its folder is missing
    for name in ("GIMP3_DIRECTORY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["gimp", "install"]) == 1
    err = capsys.readouterr().err
    assert f"no GIMP 3 profile folder at '{tmp_path / '.config' / 'GIMP' / '3.0'}'" in err
    assert "start GIMP 3 once" in err and "\n" not in err.strip()
    assert not (tmp_path / ".config").exists()


def test_install_with_command_and_token(tmp_path, capsys):
    token = tmp_path / "server-token"
    token.write_text("t" * 40 + "\n")
    token.chmod(0o600)  # as the server makes it
    profile = tmp_path / "profile"
    profile.mkdir()
    assert main(["gimp", "install", "--gimp-dir", str(profile), "--url", "http://10.0.0.5:8765",
                 "--command", "/opt/stylekit/bin/stylekit serve --weights imagenet",
                 "--token-file", str(token)]) == 0
    config_file = profile / "plug-ins" / "stylekit" / "stylekit-config.json"
    config = json.loads(config_file.read_text())
    assert config["command"] == ["/opt/stylekit/bin/stylekit", "serve", "--weights", "imagenet"]
    assert config["token"] == "t" * 40 and stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert "(with bearer token)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00binary"], ids=["empty", "binary"])
def test_install_refuses_a_token_file_without_a_usable_token(tmp_path, capsys, content):
    token = tmp_path / "server-token"
    token.write_bytes(content)
    token.chmod(0o600)
    profile = tmp_path / "profile"
    profile.mkdir()
    assert main(["gimp", "install", "--gimp-dir", str(profile), "--token-file", str(token)]) == 1
    assert "holds no usable token" in capsys.readouterr().err
    assert not (profile / "plug-ins").exists()


def test_install_refuses_a_bad_url(tmp_path, capsys):
    assert main(["gimp", "install", "--gimp-dir", str(tmp_path), "--url", "127.0.0.1:8765"]) == 2
    assert "is not an http:// URL" in capsys.readouterr().err
    assert not (tmp_path / "plug-ins").exists()


def test_a_url_without_a_port_starts_the_server_on_port_80_as_http_implies():
    assert server_command("http://127.0.0.1", Path("GIMP") / "3.0")[1:] == ["serve", "--port", "80"]


@pytest.mark.parametrize("host", ["::1", "127.0.0.2"])
def test_a_loopback_url_other_than_serves_default_starts_the_server_listening_there(host):
    url = f"http://[{host}]:9000" if ":" in host else f"http://{host}:9000"
    assert server_command(url, Path("GIMP") / "3.0")[-2:] == ["--host", host]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_install_refuses_https_for_a_server_on_this_machine(tmp_path, capsys, host):
    assert main(["gimp", "install", "--gimp-dir", str(tmp_path), "--url", f"https://{host}:8765"]) == 2
    assert "speaks plain HTTP" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_a_gimp_dir_that_does_not_exist_is_refused_not_created(tmp_path, capsys, command):
    typo = tmp_path / "GIMP" / "3.O"
    assert main(["gimp", command, "--gimp-dir", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"'{typo}' does not exist" in err and "\n" not in err.strip()
    assert not typo.exists()


def test_installing_loads_neither_torch_nor_the_server(tmp_path):
    # `stylekit gimp install` must stay quick and work where only the plug-in is wanted.
    script = (f"import sys\nfrom stylekit.cli import main\n"
              f"assert main(['gimp', 'install', '--gimp-dir', {str(tmp_path)!r}]) == 0\n"
              "print(sorted({'torch', 'fastapi', 'starlette', 'uvicorn'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(("url", "command"), [
    ("http://127.0.0.1:9000", "/opt/stylekit/bin/stylekit serve --port 8794"),
    ("http://127.0.0.1:9000", "stylekit serve --weights imagenet"),  # serve's own port, 8765
    ("http://127.0.0.1:8765", "stylekit serve --port=8794"),
])
def test_install_refuses_a_local_server_command_on_another_port_than_the_url(tmp_path, capsys, url, command):
    assert main(["gimp", "install", "--gimp-dir", str(tmp_path), "--url", url, "--command", command]) == 2
    err = capsys.readouterr().err
    assert "serves on port" in err and f"looks for the server at {url}" in err and "\n" not in err.strip()
    assert not (tmp_path / "plug-ins").exists()


def test_install_takes_a_local_server_command_on_the_urls_port(tmp_path):
    assert main(["gimp", "install", "--gimp-dir", str(tmp_path), "--url", "http://127.0.0.1:9000",
                 "--command", "stylekit serve --weights imagenet --port 9000"]) == 0


def test_install_names_the_option_of_a_command_it_cannot_split(tmp_path, capsys):
    assert main(["gimp", "install", "--gimp-dir", str(tmp_path), "--command", 'stylekit "serve']) == 2
    err = capsys.readouterr().err
    assert "--command" in err and "No closing quotation" in err and "\n" not in err.strip()


def test_copies_of_a_profile_folder_are_not_installed_into(tmp_path):
    home = tmp_path / "home"
    for name in ("3.0", "3.0 (copy)", "3.0.bak"):
        (home / ".config" / "GIMP" / name).mkdir(parents=True)
    assert gimp_dirs({}, "linux", home) == [home / ".config" / "GIMP" / "3.0"]
