"""Real Graph SDKs against graphgate.

Starts `graphgate fake-graph` (the simulated Graph API) and `graphgate serve` in front of it
with a client key, then drives graphgate with Meta's `facebook-business` SDK and with
`facebook-sdk`, each pointed at graphgate with the client key as its access token: a Page read,
paging through the SDK's own cursor iteration, an ids= read, a batch, a write, and a Page whose
tiny budget makes graphgate answer 429 / code 80001 after the queue deadline, which each SDK
raises as its own error type. Every reply body the SDKs see is checked for Meta secrets.

Run: GRAPHGATE_BIN=target/debug/graphgate python -m pytest tests/sdk  (see .ci/run).
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

import facebook  # facebook-sdk
from facebook_business.adobjects.page import Page
from facebook_business.api import FacebookAdsApi
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession

CLIENT_KEY = "sdk-client-key-0001"
# What `graphgate fake-graph` accepts (FakeGraphConfig::default) and graphgate injects.
SYSTEM_TOKEN = "demo-system-user-token"
APP_SECRET = "demo-app-secret"
THROTTLED_PAGE = "1002"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30.0):
    until = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > until:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def gateway():
    binary = os.environ.get("GRAPHGATE_BIN", "target/debug/graphgate")
    graph_port, gw_port, admin_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="graphgate-sdk-")
    config = os.path.join(tmp, "graphgate.toml")
    with open(config, "w") as f:
        f.write(
            f"""
[server]
listen = "127.0.0.1:{gw_port}"
admin_listen = "127.0.0.1:{admin_port}"
[upstream]
url = "http://127.0.0.1:{graph_port}"
timeout_ms = 5000
[credentials]
system_user_token = "{SYSTEM_TOKEN}"
app_secret = "{APP_SECRET}"
[[clients]]
name = "sdk"
key = "{CLIENT_KEY}"
pages = ["*"]
write = true
[quota]
page_calls = 100000
page_window_s = 60
queue_timeout_ms = 500
[[quota.pages]]
id = "{THROTTLED_PAGE}"
page_calls = 1
[log]
level = "info"
"""
        )
    logs = open(os.path.join(tmp, "logs.txt"), "w")
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    fake = subprocess.Popen(
        [binary, "fake-graph", "--listen", f"127.0.0.1:{graph_port}"],
        stdout=logs,
        stderr=subprocess.STDOUT,
        env=env,
    )
    gw = subprocess.Popen(
        [binary, "serve", "--config", config],
        stdout=logs,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/healthz")
        base = f"http://127.0.0.1:{gw_port}"
        yield base
    finally:
        for p in (gw, fake):
            p.terminate()
        for p in (gw, fake):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()
        with open(os.path.join(tmp, "logs.txt")) as f:
            text = f.read()
        for secret in (SYSTEM_TOKEN, APP_SECRET, CLIENT_KEY):
            assert secret not in text, f"{secret} in graphgate's logs"


def no_secrets(obj):
    text = json.dumps(obj) if not isinstance(obj, str) else obj
    for secret in (SYSTEM_TOKEN, APP_SECRET):
        assert secret not in text, f"a Meta secret reached the SDK: {text}"
    return obj


# ----------------------------------------------------------------------------- facebook-business


@pytest.fixture(scope="session")
def ads_api(gateway):
    FacebookSession.GRAPH = gateway
    return FacebookAdsApi.init(access_token=CLIENT_KEY, api_version="v21.0")


def test_business_reads_a_page(ads_api):
    page = Page("1001").api_get(fields=["id", "name", "fan_count"])
    no_secrets(page.export_all_data())
    assert page["id"] == "1001"
    assert page["name"] == "Acme Coffee"


def test_business_cursor_follows_paging_through_graphgate(ads_api):
    cursor = Page("1001").get_feed(fields=["id", "message"], params={"limit": 7})
    ids = [post["id"] for post in cursor]
    # The simulated Page has 60 posts: the cursor had to follow 9 pages of 7.
    assert len(ids) >= 60, len(ids)
    assert len(set(ids)) == len(ids), "a page was returned twice"
    assert all(i.startswith("1001_") for i in ids)


def test_business_batch(ads_api):
    results, failures = {}, []
    batch = ads_api.new_batch()
    for page_id in ("1001", "1002"):
        Page(page_id).api_get(
            fields=["id", "name"],
            batch=batch,
            success=lambda r, p=page_id: results.__setitem__(p, no_secrets(r.json())),
            failure=lambda r: failures.append(r.json()),
        )
    Page("1001").get_feed(
        fields=["id"],
        params={"limit": 2},
        batch=batch,
        success=lambda r: results.__setitem__("feed", no_secrets(r.json())),
        failure=lambda r: failures.append(r.json()),
    )
    assert batch.execute() is None
    assert not failures, failures
    assert results["1001"]["name"] == "Acme Coffee"
    assert results["1002"]["id"] == "1002"
    assert len(results["feed"]["data"]) == 2


def test_business_write(ads_api):
    post = Page("1001").create_feed(params={"message": "from facebook-business"})
    no_secrets(post.export_all_data())
    assert post["id"].startswith("1001_")
    again = Page("1001").get_feed(fields=["id", "message"], params={"limit": 1})
    first = next(iter(again))
    assert first["id"] == post["id"]
    assert first["message"] == "from facebook-business"


def test_business_throttled_page_raises_its_own_error(ads_api):
    # Page 1002's budget is 1 call per minute: after one upstream call, distinct reads wait
    # past the 500 ms queue deadline and get graphgate's 429 / code 80001.
    err = None
    for i in range(3):
        try:
            Page(THROTTLED_PAGE).api_get(fields=["id"], params={"limit": 100 + i})
        except FacebookRequestError as e:
            err = e
            break
    assert err is not None, "never throttled"
    assert err.http_status() == 429
    assert err.api_error_code() == 80001
    assert err.api_transient_error() is True
    no_secrets(err.body())


# ------------------------------------------------------------------------------- facebook-sdk


def graph_api(key):
    # facebook-sdk 3.1.0 accepts only versions matching ^\d\.\d{1,2}$ up to 3.1, so
    # version="21.0" raises; set the version after construction instead.
    api = facebook.GraphAPI(access_token=key, version="3.1")
    api.version = "v21.0"
    return api


@pytest.fixture(scope="session")
def graph(gateway):
    facebook.FACEBOOK_GRAPH_URL = gateway + "/"
    return graph_api(CLIENT_KEY)


def test_sdk_reads_a_page(graph):
    page = no_secrets(graph.get_object("1001", fields="id,name,about"))
    assert page["id"] == "1001"
    assert page["name"] == "Acme Coffee"


def test_sdk_get_all_connections_follows_next_links(graph):
    # get_all_connections parses each paging.next and deletes its access_token (KeyError if
    # the link had none): graphgate's links carry the caller's key where Graph put a token.
    posts = list(graph.get_all_connections("1001", "feed", limit=11, fields="id"))
    ids = [p["id"] for p in posts]
    assert len(ids) >= 60, len(ids)
    assert len(set(ids)) == len(ids)


def test_sdk_ids_read(graph):
    objs = no_secrets(graph.get_objects(ids=["1001", "1001_3"], fields="id"))
    assert set(objs) == {"1001", "1001_3"}
    assert objs["1001_3"]["id"] == "1001_3"


def test_sdk_write_and_read_back(graph):
    created = no_secrets(graph.put_object("1001", "feed", message="from facebook-sdk"))
    assert created["id"].startswith("1001_")
    post = no_secrets(graph.get_object(created["id"], fields="message"))
    assert post["message"] == "from facebook-sdk"
    graph.request(created["id"], post_args={"message": "edited"})
    assert graph.get_object(created["id"], fields="message")["message"] == "edited"
    graph.delete_object(created["id"])


def test_sdk_throttled_page_raises_graph_api_error(graph):
    err = None
    for i in range(3):
        try:
            graph.get_object(THROTTLED_PAGE, fields="name", limit=200 + i)
        except facebook.GraphAPIError as e:
            err = e
            break
    assert err is not None, "never throttled"
    assert err.code == 80001
    assert err.type == "OAuthException"
    no_secrets(err.result)


def test_sdk_unknown_key_is_an_oauth_error(gateway):
    facebook.FACEBOOK_GRAPH_URL = gateway + "/"
    bad = graph_api("not-a-graphgate-key")
    with pytest.raises(facebook.GraphAPIError) as info:
        bad.get_object("1001")
    assert info.value.code == 190
