"""scripts/release.sh under the variables a CircleCI pipeline sets.

A CircleCI project names the registry by its parts, AWS_ACCOUNT_ID,
ECR_AWS_REGION and ECR_REPOSITORY_NAME, and CircleCI numbers builds in
CIRCLE_BUILD_NUM; the script derives the image reference from them. Every run
here is a --dry-run with stand-in docker and aws that fail the test if called.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = (ROOT / "VERSION").read_text().strip()
ACCOUNT = "123456789012"
RELEASE_VARIABLES = (
    "BUILD_NUMBER",
    "CIRCLE_BUILD_NUM",
    "ECR_REGISTRY",
    "AWS_ACCOUNT_ID",
    "ECR_AWS_REGION",
    "AWS_REGION",
    "ECR_REPOSITORY",
    "ECR_REPOSITORY_NAME",
)


@pytest.fixture
def release(tmp_path):
    """Run the script with only the given release variables set."""
    bin_dir, called = tmp_path / "bin", tmp_path / "called"
    bin_dir.mkdir()
    for tool in ("docker", "aws"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {called}\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in RELEASE_VARIABLES}
    base["PATH"] = f"{bin_dir}{os.pathsep}{base['PATH']}"

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "release.sh"), "--dry-run", *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert not called.exists(), "a dry run ran docker or aws"
        return result

    return run


def plan(result: subprocess.CompletedProcess) -> tuple[list[str], str, list[str]]:
    """(tags of the build, the login line, the pushed references)."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    (build,) = [line for line in lines if line.startswith("docker build")]
    words = build.split()
    tags = [words[i + 1] for i, word in enumerate(words) if word == "-t"]
    (login,) = [line for line in lines if line.startswith("aws ecr get-login-password")]
    pushes = [line.removeprefix("docker push ") for line in lines if line.startswith("docker push")]
    assert f"--label org.opencontainers.image.version={tags[0].rsplit(':', 1)[1]}" in build
    return tags, login, pushes


def expected(image: str, build: str) -> list[str]:
    return [f"{image}:{VERSION}-{build}", f"{image}:{VERSION}", f"{image}:latest"]


def test_circleci_variables_name_the_image_and_the_tag(release):
    result = release(
        AWS_ACCOUNT_ID=ACCOUNT, ECR_AWS_REGION="us-east-2", ECR_REPOSITORY_NAME="search/colbert", CIRCLE_BUILD_NUM="314"
    )
    tags, login, pushes = plan(result)
    registry = f"{ACCOUNT}.dkr.ecr.us-east-2.amazonaws.com"
    assert tags == pushes == expected(f"{registry}/search/colbert", "314")
    assert (
        login
        == f"aws ecr get-login-password --region us-east-2 | docker login --username AWS --password-stdin {registry}"
    )


def test_account_alone_means_eu_west_1_and_colbert_server(release):
    tags, login, _ = plan(release(AWS_ACCOUNT_ID=ACCOUNT, BUILD_NUMBER="7"))
    assert tags == expected(f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/colbert-server", "7")
    assert "--region eu-west-1 |" in login


def test_region_flag_places_the_derived_registry(release):
    tags, _, _ = plan(release("--region", "ap-south-1", AWS_ACCOUNT_ID=ACCOUNT, CIRCLE_BUILD_NUM="9"))
    assert tags[0] == f"{ACCOUNT}.dkr.ecr.ap-south-1.amazonaws.com/colbert-server:{VERSION}-9"


def test_china_regions_use_their_own_domain(release):
    tags, _, _ = plan(release(AWS_ACCOUNT_ID=ACCOUNT, ECR_AWS_REGION="cn-north-1", CIRCLE_BUILD_NUM="9"))
    assert tags[0].startswith(f"{ACCOUNT}.dkr.ecr.cn-north-1.amazonaws.com.cn/colbert-server:")


def test_build_number_wins_over_circle_build_num_and_the_flag_over_both(release):
    env = {"AWS_ACCOUNT_ID": ACCOUNT, "CIRCLE_BUILD_NUM": "314"}
    assert plan(release(BUILD_NUMBER="42", **env))[0][0].endswith(f":{VERSION}-42")
    assert plan(release("--build-number", "43", BUILD_NUMBER="42", **env))[0][0].endswith(f":{VERSION}-43")


def test_an_explicit_registry_wins_over_the_account(release):
    registry = "210987654321.dkr.ecr.eu-central-1.amazonaws.com"
    tags, _, _ = plan(release(ECR_REGISTRY=registry, AWS_ACCOUNT_ID=ACCOUNT, CIRCLE_BUILD_NUM="5"))
    assert tags == expected(f"{registry}/colbert-server", "5")


def test_repository_flag_and_ecr_repository_win(release):
    env = {"AWS_ACCOUNT_ID": ACCOUNT, "CIRCLE_BUILD_NUM": "5", "ECR_REPOSITORY_NAME": "from-circle"}
    assert "/from-flag:" in plan(release("--repository", "from-flag", ECR_REPOSITORY="other", **env))[0][0]
    assert "/from-circle:" in plan(release(ECR_REPOSITORY="from-circle", **env))[0][0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AWS_ACCOUNT_ID": ACCOUNT}, "no build number"),
        ({"CIRCLE_BUILD_NUM": "5"}, "no registry"),
        ({"AWS_ACCOUNT_ID": "1234", "CIRCLE_BUILD_NUM": "5"}, "not a 12-digit AWS account id"),
        ({"AWS_ACCOUNT_ID": ACCOUNT, "ECR_AWS_REGION": "EU WEST", "CIRCLE_BUILD_NUM": "5"}, "not an AWS region"),
        ({"AWS_ACCOUNT_ID": ACCOUNT, "CIRCLE_BUILD_NUM": "5-1"}, "build number '5-1'"),
        (
            {
                "ECR_REGISTRY": f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com",
                "ECR_AWS_REGION": "us-east-1",
                "CIRCLE_BUILD_NUM": "5",
            },
            "differs from the registry's region eu-west-1",
        ),
        (
            {"AWS_ACCOUNT_ID": ACCOUNT, "CIRCLE_BUILD_NUM": "5", "ECR_REPOSITORY": "a", "ECR_REPOSITORY_NAME": "b"},
            "ECR_REPOSITORY 'a' and ECR_REPOSITORY_NAME 'b' differ",
        ),
    ],
)
def test_refuses_missing_or_conflicting_variables(release, env, message):
    result = release(**env)
    assert result.returncode != 0
    assert message in result.stderr
