"""The pages' routes, relative to the host's route prefix, and their template renderer."""

# The pages' own renderer, so a host's Jinja2 settings (autoescape off, say) never reach them.
RENDERER = ".depproxy_jinja2"
GROUP = "/groups/{group:.+?}/-/dependency_proxy"
ROUTES = {
    "depproxy.pages.sign_in": "/-/dependency_proxy/sign_in",
    "depproxy.pages.sign_out": "/-/dependency_proxy/sign_out",
    "depproxy.pages.admin": "/admin/dependency_proxy",
    "depproxy.pages.group": GROUP,
    "depproxy.pages.group_settings": GROUP + "/settings",
    "depproxy.pages.group_ttl": GROUP + "/ttl",
    "depproxy.pages.group_credentials": GROUP + "/credentials",
    "depproxy.pages.group_purge": GROUP + "/purge",
}
GROUP_ROUTES = tuple(name for name in ROUTES if name.startswith("depproxy.pages.group"))
