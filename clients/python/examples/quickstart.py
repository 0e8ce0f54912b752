"""Start a local sbx (the `sbx` on PATH), run code in a microVM, print its output."""

from sbx_client import Sandbox


def main() -> None:
    with Sandbox.local() as sbx:
        result = sbx.run('print("hello from a microVM")')
        print(result.stdout, end="")

        # A session keeps one VM and its interpreter state across calls.
        with sbx.session(language="python") as s:
            s.write_file("data.txt", b"41")
            s.exec("x = int(open('data.txt').read())")
            print(s.exec("print(x + 1)").stdout, end="")


if __name__ == "__main__":
    main()
