"""Drive the fake Arvados API with the real arvados-python-client.

Usage: sdk_against_fake.py BASE_URL TOKEN
The SDK reads the discovery document, then lists Queued containers with a filter and locks
one. Prints one JSON object with what it saw, for the Rust test to check.
"""
import json
import sys

import arvados


def main():
    base, token = sys.argv[1], sys.argv[2]
    api = arvados.api.api_client(
        "v1",
        base + "/discovery/v1/apis/{api}/{apiVersion}/rest",
        token,
        cache=False,
        num_retries=0,
    )
    me = api.api_client_authorizations().current().execute()
    queued = api.containers().list(
        filters=[["state", "=", "Queued"], ["priority", ">", "0"]],
        order=["priority desc"],
        limit=10,
        select=["uuid", "state", "priority", "runtime_constraints"],
    ).execute()
    target = queued["items"][0]["uuid"]
    locked = api.containers().lock(uuid=target).execute()
    again = api.containers().get(uuid=target).execute()
    try:
        api.containers().lock(uuid=target).execute()
        relock = "no error"
    except arvados.errors.ApiError as e:
        relock = "%s %s" % (e.resp.status, e._get_reason())
    print(json.dumps({
        "me": me["uuid"],
        "listed": [c["uuid"] for c in queued["items"]],
        "priorities": [c["priority"] for c in queued["items"]],
        "locked_state": locked["state"],
        "locked_by": again["locked_by_uuid"],
        "relock": relock,
    }))


if __name__ == "__main__":
    main()
