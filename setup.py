from setuptools import find_packages, setup

# The migrations live in the top-level alembic/ (where users expect them) and ship inside the
# package as depproxy_pyramid.alembic, so an installed wheel can run `initdb`.
setup(
    packages=[
        *find_packages(include=["depproxy_pyramid", "depproxy_pyramid.*"]),
        "depproxy_pyramid.alembic",
        "depproxy_pyramid.alembic.versions",
    ],
    package_dir={"depproxy_pyramid.alembic": "alembic"},
    package_data={"depproxy_pyramid.alembic": ["script.py.mako"]},
)
