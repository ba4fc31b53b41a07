#!/usr/bin/env bash
# Build the image and push it to Amazon ECR as <version>-<build>, <version>
# and latest, <version> being the VERSION file.
#
#   scripts/release.sh --build-number 42 --registry 123456789012.dkr.ecr.eu-west-1.amazonaws.com
#   BUILD_NUMBER=42 ECR_REGISTRY=... scripts/release.sh --dry-run
#   AWS_ACCOUNT_ID=123456789012 CIRCLE_BUILD_NUM=42 scripts/release.sh   (a CircleCI pipeline)
#
# Options (each also from the environment; a flag wins over a variable):
#   --build-number N   BUILD_NUMBER, else CIRCLE_BUILD_NUM
#                          required; letters, digits, '.' and '_'
#   --registry HOST    ECR_REGISTRY     <account>.dkr.ecr.<region>.amazonaws.com; without one,
#                      AWS_ACCOUNT_ID   the registry is <AWS_ACCOUNT_ID>.dkr.ecr.<region>.amazonaws.com
#   --region R         ECR_AWS_REGION   the registry's region (default: the registry's, else eu-west-1);
#                                       one that differs from the registry's is refused
#                                       (AWS_REGION, often set for other AWS calls, is not used)
#   --repository NAME  ECR_REPOSITORY, or ECR_REPOSITORY_NAME   default: colbert-server
#   --dry-run                           print every command instead of running it
set -euo pipefail
# The repository root, in plain bash (as serve.sh);
# "bash release.sh" run from scripts/ has no slash in $0.
case $0 in */*) cd "${0%/*}/.." ;; *) cd .. ;; esac

die() {
  echo "release: $*" >&2
  exit 2
}

# BUILD_NUMBER wins over CircleCI's CIRCLE_BUILD_NUM: a pipeline may number its releases itself.
build_number=${BUILD_NUMBER:-${CIRCLE_BUILD_NUM:-}}
registry=${ECR_REGISTRY:-}
region=${ECR_AWS_REGION:-}
repository=
repository_flag=0
dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --build-number) build_number=${2-}; shift 2 || die "--build-number needs a value" ;;
    --registry) registry=${2-}; shift 2 || die "--registry needs a value" ;;
    --region) region=${2-}; shift 2 || die "--region needs a value" ;;
    --repository) repository=${2-}; repository_flag=1; shift 2 || die "--repository needs a value" ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,19s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

if [ "$repository_flag" = 0 ]; then
  # Two names for one setting: when both are set they must agree.
  [ -z "${ECR_REPOSITORY:-}" ] || [ -z "${ECR_REPOSITORY_NAME:-}" ] || [ "$ECR_REPOSITORY" = "$ECR_REPOSITORY_NAME" ] ||
    die "ECR_REPOSITORY '$ECR_REPOSITORY' and ECR_REPOSITORY_NAME '$ECR_REPOSITORY_NAME' differ"
  repository=${ECR_REPOSITORY:-${ECR_REPOSITORY_NAME:-colbert-server}}
fi

version=$(tr -d '[:space:]' < VERSION)
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+([.a-z0-9]*)$ ]] || die "VERSION holds '$version', not a version like 1.2.3"
[ -n "$build_number" ] || die "no build number: pass --build-number N or set BUILD_NUMBER (or CIRCLE_BUILD_NUM)"
[[ $build_number =~ ^[A-Za-z0-9._]+$ ]] || die "build number '$build_number' may hold only letters, digits, '.' and '_'"
if [ -z "$registry" ] && [ -n "${AWS_ACCOUNT_ID:-}" ]; then
  [[ $AWS_ACCOUNT_ID =~ ^[0-9]{12}$ ]] || die "AWS_ACCOUNT_ID '$AWS_ACCOUNT_ID' is not a 12-digit AWS account id"
  account_region=${region:-eu-west-1}  # the region of the README's examples
  [[ $account_region =~ ^[a-z0-9-]+$ ]] || die "region '$account_region' is not an AWS region name"
  domain=amazonaws.com
  case $account_region in cn-*) domain=amazonaws.com.cn ;; esac
  registry=$AWS_ACCOUNT_ID.dkr.ecr.$account_region.$domain
fi
[ -n "$registry" ] ||
  die "no registry: pass --registry <account>.dkr.ecr.<region>.amazonaws.com, or set ECR_REGISTRY or AWS_ACCOUNT_ID"
[[ $registry =~ ^[0-9]{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$ ]] ||
  die "registry '$registry' is not an ECR registry (<account>.dkr.ecr.<region>.amazonaws.com)"
[ -z "$region" ] || [ "$region" = "${BASH_REMATCH[1]}" ] ||
  die "region $region (--region or ECR_AWS_REGION) differs from the registry's region ${BASH_REMATCH[1]}: the login would fail"
region=${BASH_REMATCH[1]}
[[ $repository =~ ^[a-z0-9]+([._/-][a-z0-9]+)*$ ]] || die "repository '$repository' is not a valid ECR repository name"

image=$registry/$repository
tags=("$image:$version-$build_number" "$image:$version" "$image:latest")

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

login() {
  if [ "$dry_run" = 1 ]; then
    echo "aws ecr get-login-password --region $region | docker login --username AWS --password-stdin $registry"
  else
    aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"
  fi
}

run docker build \
  --label "org.opencontainers.image.version=$version-$build_number" \
  -t "${tags[0]}" -t "${tags[1]}" -t "${tags[2]}" .
login
for tag in "${tags[@]}"; do
  run docker push "$tag"
done
