#!/usr/bin/env sh
# Point this project's DVC cache at the team's S3-compatible store (MinIO of infra/compose.yaml).
# Run once in the repository root and commit .dvc/config:
#
#   sh infra/dvc/add-remote.sh                       # MinIO on this machine
#   DVC_S3_ENDPOINT=http://minio.internal:9000 sh infra/dvc/add-remote.sh
#
# Credentials are not written anywhere: DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
# (the MinIO user of infra/.env) from the environment. Pushing needs the `team` extra
# (`uv sync --extra team`, which installs dvc-s3).
set -eu
REMOTE="${DVC_REMOTE_NAME:-team}"
BUCKET="${DVC_BUCKET:-distillery-dvc}"
ENDPOINT="${DVC_S3_ENDPOINT:-http://localhost:9000}"
dvc remote add --force --default "$REMOTE" "s3://$BUCKET/cache"
dvc remote modify "$REMOTE" endpointurl "$ENDPOINT"
dvc remote modify "$REMOTE" region us-east-1
echo "DVC remote '$REMOTE' -> s3://$BUCKET/cache at $ENDPOINT (default remote)"
