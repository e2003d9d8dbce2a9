"""Sets up a fresh moto server the way an AWS admin sets up an account for Valet.

Run against a moto server started with INITIAL_NO_AUTH_ACTION_COUNT equal to SETUP_CALLS: the
calls below are the only unauthenticated ones, and the last step proves that authentication is
on. Prints one JSON object: the broker user's access key and what was created.

    python moto_setup.py http://127.0.0.1:PORT
"""

import json
import sys

import boto3
import botocore.exceptions

SETUP_CALLS = 7  # keep in step with the calls below and with tests/src/moto.rs
ACCOUNT = "123456789012"
ROLE = "valet-agent"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
USER = "valet-broker"
BUCKET = "reports-blue"


def main(endpoint: str) -> None:
    anonymous = dict(
        endpoint_url=endpoint,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
        region_name="us-east-1",
    )
    iam = boto3.client("iam", **anonymous)
    s3 = boto3.client("s3", **anonymous)

    # 1-3: the IAM user valetd signs as, its access key, and what it may do: assume the agent
    # role, and read and write that role's inline policies (for revocation).
    iam.create_user(UserName=USER)
    key = iam.create_access_key(UserName=USER)["AccessKey"]
    iam.put_user_policy(
        UserName=USER,
        PolicyName="valet-broker",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"], "Resource": ROLE_ARN},
                    {"Effect": "Allow", "Action": ["iam:GetRolePolicy", "iam:PutRolePolicy", "iam:ListRolePolicies"], "Resource": ROLE_ARN},
                ],
            }
        ),
    )
    # 4-5: the role agents act as, trusting only the broker user, allowed to read report buckets.
    iam.create_role(
        RoleName=ROLE,
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/{USER}"},
                        "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
                    }
                ],
            }
        ),
    )
    iam.put_role_policy(
        RoleName=ROLE,
        PolicyName="read-reports",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["s3:ListBucket", "s3:GetObject"],
                        "Resource": ["arn:aws:s3:::reports-*", "arn:aws:s3:::reports-*/*"],
                    }
                ],
            }
        ),
    )
    # 6-7: a bucket with one object for the agent to list.
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="q3/summary.txt", Body=b"revenue up")

    # Authentication must now be on: the same anonymous key is refused.
    try:
        boto3.client("sts", **anonymous).get_caller_identity()
    except botocore.exceptions.ClientError as error:
        code = error.response["Error"]["Code"]
    else:
        sys.exit("moto still answers unauthenticated calls: SETUP_CALLS does not match the calls made")

    print(
        json.dumps(
            {
                "access_key_id": key["AccessKeyId"],
                "secret_access_key": key["SecretAccessKey"],
                "role_arn": ROLE_ARN,
                "bucket": BUCKET,
                "refused_anonymous_with": code,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
