"""``[alerts]`` in node.toml: parsed, bounded, https only (docs/ALERTS.md)."""

from __future__ import annotations

import pytest

from citynode.config import ALERT_URLS_MAX, AlertsConfig, parse_config, render_config
from citynode.errors import ConfigError

MIN = '[node]\nname = "Jakarta"\n'


def alerts(body: str) -> AlertsConfig:
    return parse_config(MIN + "[alerts]\n" + body).alerts


def test_defaults_send_nothing_and_the_rendered_file_documents_the_section() -> None:
    assert parse_config(MIN).alerts == AlertsConfig()
    assert AlertsConfig().webhook_urls == ()
    text = render_config("Jakarta", "127.0.0.1:8443", "https://127.0.0.1:8443", ["localhost"])
    section = text[text.index("[alerts]"):]
    for key in ("webhook_urls", "partner_down_minutes", "disk_free_percent",
                "invalid_rate_per_minute", "retry_attempts", "retry_base_seconds"):
        assert f"\n{key} = " in section, key
    assert parse_config(text).alerts == AlertsConfig()


def test_urls_https_or_explicit_loopback_http() -> None:
    a = alerts('webhook_urls = ["https://hooks.example.org/citynode"]\n'
               "partner_down_minutes = 0.5\ninvalid_rate_per_minute = 7\n")
    assert a.webhook_urls == ("https://hooks.example.org/citynode",)
    assert a.partner_down_minutes == 0.5 and a.invalid_rate_per_minute == 7
    assert alerts('webhook_urls = ["http://127.0.0.1:9000/h"]\nallow_http_loopback = true\n'
                  ).webhook_urls == ("http://127.0.0.1:9000/h",)
    for body, what in [
        ('webhook_urls = ["http://127.0.0.1:9000/h"]\n', 'must start with "https://"'),
        ('webhook_urls = ["http://hooks.example.org/h"]\nallow_http_loopback = true\n',
         'must start with "https://"'),
        ('webhook_urls = ["ftp://x.example.org/"]\n', "must start with"),
        ('webhook_urls = ["https://u:p@x.example.org/"]\n', "user info"),
        ("webhook_urls = [" + ", ".join(f'"https://h{i}.example.org/"'
                                        for i in range(ALERT_URLS_MAX + 1)) + "]\n",
         f"at most {ALERT_URLS_MAX} URLs"),
        ("partner_down_minutes = 0\n", "greater than 0"),
        ("retry_attempts = 100\n", "at most 20"),
        ("queue_max = 0\n", "at least 1"),
        ("disk_free_percent = 100\n", "at most 99"),
        ("webhook_url = []\n", "did you mean webhook_urls?"),
    ]:
        with pytest.raises(ConfigError) as e:
            alerts(body)
        assert "[alerts]" in str(e.value) and what in str(e.value), (body, str(e.value))
