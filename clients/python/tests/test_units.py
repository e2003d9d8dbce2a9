"""The client's parts that need no valetd: settings from the environment, secrets that never
print, the gateway's 428 parsing, TTLs."""

from __future__ import annotations

import datetime
import pickle

import pytest

import valet
from valet._calls import ttl_seconds
from valet.gateway import approval_id_of


def test_settings_read_the_cli_variables_and_say_what_is_wrong(tmp_path):
    settings = valet.Settings.from_env({"VALET_SERVER": "https://valet.internal:7470", "VALET_KEY": " vk_x "})
    assert settings.secure and settings.target == "valet.internal:7470"
    assert isinstance(settings.credential, valet.PrincipalKey) and settings.metadata() == [("authorization", "Bearer vk_x")]
    assert valet.Settings.from_env({"VALET_KEY": "vk_x"}).target == "127.0.0.1:7470"
    with pytest.raises(valet.ConfigurationError, match="no credential"):
        valet.Settings.from_env({})
    with pytest.raises(valet.ConfigurationError, match="go together"):
        valet.Settings.from_env({"VALET_KEY": "k", "VALET_SERVER": "https://h:1", "VALET_CLIENT_CERT": "c"})
    with pytest.raises(valet.ConfigurationError, match="use https://"):
        valet.Settings.from_env({"VALET_KEY": "k", "VALET_CA_FILE": "ca.pem"})
    with pytest.raises(valet.ConfigurationError, match="the scheme ftp:// is not supported"):
        valet.Settings.from_env({"VALET_KEY": "k", "VALET_SERVER": "ftp://h:1"})
    # As the CLI reads them: a scheme in any case means what it says (HTTPS is TLS), and an
    # address without one is refused, never taken for plaintext.
    for server in ("HTTPS://valet.internal:7470", "Https://valet.internal:7470"):
        settings = valet.Settings.from_env({"VALET_KEY": "k", "VALET_SERVER": server})
        assert settings.secure and settings.target == "valet.internal:7470"
    assert not valet.Settings.from_env({"VALET_KEY": "k", "VALET_SERVER": "HTTP://127.0.0.1:1"}).secure
    for server in ("valet.internal:7470", "127.0.0.1:7470", "//valet.internal:7470"):
        with pytest.raises(valet.ConfigurationError, match="no scheme|must be"):
            valet.Settings.from_env({"VALET_KEY": "k", "VALET_SERVER": server})
    with pytest.raises(valet.ConfigurationError, match="cannot read the identity token file"):
        valet.Settings.from_env({"VALET_IDENTITY_TOKEN_FILE": str(tmp_path / "absent")})
    token = tmp_path / "token"
    token.write_text("eyJ.identity.token\n")
    settings = valet.Settings.from_env({"VALET_IDENTITY_TOKEN_FILE": str(token)})
    assert settings.metadata() == [("authorization", "Bearer eyJ.identity.token")]
    # The key comes first, as in the CLI.
    both = valet.Settings.from_env({"VALET_KEY": "vk_first", "VALET_IDENTITY_TOKEN_FILE": str(token)})
    assert isinstance(both.credential, valet.PrincipalKey)


def test_secrets_never_print():
    secret = valet.Secret("tok_very_secret_value")
    assert "tok_very_secret_value" not in repr(secret) and "tok_very_secret_value" not in str(secret)
    assert "tok_very_secret_value" not in repr(valet.PrincipalKey("tok_very_secret_value"))
    assert f"{secret}" == str(secret) and secret.reveal() == "tok_very_secret_value"
    assert len(secret.fingerprint) == 12
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    error = valet.ValetError("refused", request_id="abc")
    assert "abc" in str(error) and "refused" in repr(error)


def test_a_428_from_the_gateway_names_its_approval():
    body = b'{"error":"approval_required","approval_id":"ap_01","message":"..."}'
    assert approval_id_of(428, body) == "ap_01"
    assert approval_id_of(403, body) is None
    assert approval_id_of(428, b"not json") is None
    assert approval_id_of(428, b'{"error":"other","approval_id":"ap_01"}') is None


def test_ttls_are_whole_positive_seconds():
    assert ttl_seconds(None) == 0
    assert ttl_seconds(90) == 90 and ttl_seconds(datetime.timedelta(minutes=2)) == 120
    with pytest.raises(ValueError, match="positive"):
        ttl_seconds(0)
