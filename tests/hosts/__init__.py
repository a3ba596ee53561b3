"""Host portals of the shapes users embed the add-on in, each buildable with or without it.

Every host's `make_app(settings, with_addon)` builds the same host twice, so tests can check
that including the add-on changes nothing about the host's own pages, sign-in and writes.
"""
