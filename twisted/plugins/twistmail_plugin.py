"""twistd plugin: ``twistd -n twistmail --config etc/twistmail.toml``.

Kept tiny on purpose: twistd imports every plugin module whenever its plugin
cache is stale, so the real work is imported lazily from ``twistmail.tap``.
"""

from twisted.application.service import ServiceMaker

twistmail = ServiceMaker(
    "twistmail",
    "twistmail.tap",
    "twistmail mail appliance (SMTP and POP3 with prestart job pools)",
    "twistmail",
)
