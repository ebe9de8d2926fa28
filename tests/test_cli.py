"""The real `cartridge` command line in a subprocess: JSON documents and exit codes."""

import json

from conftest import run_cli, write


def test_ingest_list_versions_json(tmp_path, cartridge_home):
    root = tmp_path / "vault"
    write(root, "one.md", "First note about the lighthouse.\n")
    write(root, "keys/id_rsa", "-----BEGIN KEY-----\n")
    proc = run_cli("ingest", str(root), "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["corpus"] == {"name": "vault", "root": str(root.resolve())}
    assert doc["version"] == 1 and doc["changed"] is True and doc["tokens"] > 0
    files = {f["path"]: f for f in doc["files"]}
    assert files["one.md"]["status"] == "included" and files["one.md"]["tokens"] > 0
    assert files["keys/id_rsa"] == {"path": "keys/id_rsa", "status": "skipped", "reason": "secret", "tokens": None}

    again = json.loads(run_cli("ingest", str(root), "--json", env_home=cartridge_home).stdout)
    assert again["changed"] is False and again["version"] == 1

    listing = json.loads(run_cli("list", "--json", env_home=cartridge_home).stdout)
    assert [c["name"] for c in listing["corpora"]] == ["vault"]

    versions = json.loads(run_cli("versions", "vault", "--json", env_home=cartridge_home).stdout)
    assert [v["number"] for v in versions["versions"]] == [1]
    assert {"number", "status", "files", "tokens", "created"} <= set(versions["versions"][0])


def test_bad_input_is_one_line_exit_2(tmp_path, cartridge_home):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = write(tmp_path, "f.md", "x\n")
    for args in [("ingest", str(tmp_path / "missing")), ("ingest", str(a_file)), ("ingest", str(empty)),
                 ("versions", "nope"), ("frobnicate",), ("ingest",)]:
        proc = run_cli(*args, env_home=cartridge_home)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    listing = json.loads(run_cli("list", "--json", env_home=cartridge_home).stdout)
    assert listing == {"corpora": []}


def test_llama_server_on_a_port_in_use_says_so(cartridge_home):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("llama-server", "--port", str(port), env_home=cartridge_home, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"error: port {port} is in use; pick another with --port\n"


def test_ingest_options_given_once_are_kept_and_one_option_changes_only_itself(tmp_path, cartridge_home):
    root = tmp_path / "vault"
    write(root, "one.md", "First note about the lighthouse.\n")
    write(root, "big.md", "The lighthouse keeper's long log.\n" * 100)  # 3,400 bytes
    write(root, ".env", "TOKEN=abc\n")

    def ingest(*flags):
        proc = run_cli("ingest", str(root), *flags, "--json", env_home=cartridge_home)
        assert proc.returncode == 0, proc.stderr
        return {f["path"]: f["status"] for f in json.loads(proc.stdout)["files"]}

    assert ingest("--max-file-bytes", "1000")["big.md"] == "skipped"
    assert ingest("--allow-secrets") == {"one.md": "included", "big.md": "skipped", ".env": "included"}
    assert ingest() == {"one.md": "included", "big.md": "skipped", ".env": "included"}
    assert ingest("--no-allow-secrets", "--max-file-bytes", "5000") == {
        "one.md": "included", "big.md": "included", ".env": "skipped"}
    proc = run_cli("ingest", str(root), "--max-file-bytes", "0", env_home=cartridge_home)
    assert proc.returncode == 2 and proc.stderr == "error: --max-file-bytes must be at least 1\n"
