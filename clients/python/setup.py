"""Builds the package with its gRPC stubs: protoc (from grpcio-tools) compiles the proto files
into the build directory as `valet.v1`, so the wheel carries stubs that match the protos it was
built from. The protos are read from the repository (`../../proto`) or, in an sdist, from
`proto/` next to this file."""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent


def proto_root() -> pathlib.Path:
    for candidate in (HERE / "proto", HERE.parent.parent / "proto"):
        if (candidate / "valet" / "v1").is_dir():
            return candidate
    raise SystemExit(
        "cannot find the Valet proto files (proto/valet/v1): build from the Valet repository, "
        "or from an sdist that carries them"
    )


class BuildWithStubs(build_py):
    def run(self) -> None:
        # A build directory left from an earlier build may hold modules since removed: start clean.
        import shutil

        shutil.rmtree(pathlib.Path(self.build_lib) / "valet", ignore_errors=True)
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        root = proto_root()
        out = pathlib.Path(self.build_lib)
        include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        files = sorted(
            str(path.relative_to(root)) for path in (root / "valet" / "v1").glob("*.proto")
        )
        status = protoc.main(
            [
                "protoc",
                f"-I{root}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *files,
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed ({status}) on {', '.join(files)}")
        (out / "valet" / "v1").mkdir(parents=True, exist_ok=True)
        (out / "valet" / "v1" / "__init__.py").write_text(
            '"""Generated from proto/valet/v1 when this package was built. Do not edit."""\n'
        )


class SdistWithProtos(sdist):
    """An sdist carries the protos, so a wheel can be built from it alone."""

    def make_release_tree(self, base_dir: str, files: list) -> None:
        super().make_release_tree(base_dir, files)
        import shutil

        shutil.copytree(proto_root(), os.path.join(base_dir, "proto"), dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos})
