# sbx guest agent: persistent Python REPL wrapper.
#
# Requests arrive on fd 3 as "<length>\n<json>" with {"id", "code", "env"}. User code
# runs in __main__'s namespace, so state persists. Completion is reported only on fd 4
# (never on stdout/stderr) as "<id> <exit code>\n", and only by the original wrapper
# process: a forked child that returns into this loop exits silently.
class _SbxMultiprocessingHook:
    """Makes multiprocessing pickle with cloudpickle, so functions defined in the REPL
    (lambdas, closures, classes) reach worker processes (Pool, Process under spawn or
    forkserver).

    Nothing is imported up front: this import hook waits for multiprocessing.process,
    wraps BaseProcess.start, and the first start (every Pool starts its workers that way)
    imports cloudpickle and patches multiprocessing.reduction."""

    busy = False
    patched = False

    def find_spec(self, name, path=None, target=None):
        if name != "multiprocessing.process" or self.busy:
            return None
        import importlib.util

        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        loader = spec and spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        hook = self
        orig_exec = loader.exec_module

        def exec_module(module):
            orig_exec(module)
            hook.wrap_start(module)

        loader.exec_module = exec_module
        return spec

    def wrap_start(self, module):
        import sys

        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        base = module.BaseProcess
        orig_start = base.start
        hook = self

        def start(proc):
            hook.use_cloudpickle()
            return orig_start(proc)

        start.__doc__ = orig_start.__doc__
        start.__wrapped__ = orig_start
        base.start = start

    def use_cloudpickle(self):
        if self.patched:
            return
        self.patched = True
        try:
            import collections
            import io

            import cloudpickle
            from multiprocessing import reduction
        except Exception:
            return
        fp = reduction.ForkingPickler

        class CloudForkingPickler(cloudpickle.Pickler):
            # A class attribute: the C pickler reads dispatch_table once, in __init__.
            # The ChainMap keeps later multiprocessing registrations visible.
            dispatch_table = collections.ChainMap(
                fp._extra_reducers, cloudpickle.Pickler.dispatch_table
            )

        def dumps(cls, obj, protocol=None):
            buf = io.BytesIO()
            CloudForkingPickler(buf, protocol).dump(obj)
            return buf.getbuffer()

        def dump(obj, file, protocol=None):
            CloudForkingPickler(file, protocol).dump(obj)

        fp.dumps = classmethod(dumps)
        reduction.dump = dump


def _sbx_repl():
    import json
    import linecache
    import os
    import sys
    import traceback

    g = sys.modules["__main__"].__dict__
    sys.meta_path.insert(0, _SbxMultiprocessingHook())
    g.pop("_sbx_repl", None)
    g.pop("_SbxMultiprocessingHook", None)
    pid = os.getpid()
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except Exception:
        pass
    for fd in (3, 4):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:
        pass
    buf = bytearray()

    def more():
        chunk = os.read(3, 1 << 16)
        if not chunk:
            os._exit(0)
        buf.extend(chunk)

    def read_request():
        while b"\n" not in buf:
            more()
        i = buf.index(b"\n")
        n = int(buf[:i])
        del buf[: i + 1]
        while len(buf) < n:
            more()
        data = bytes(buf[:n])
        del buf[:n]
        return json.loads(data)

    def exit_status(e):
        c = e.code
        if c is None:
            return 0
        if isinstance(c, int):
            return c & 0xFF
        try:
            print(c, file=sys.stderr)
        except Exception:
            pass
        return 1

    def reseed():
        # After a snapshot restore every clone holds the same generator states: reseed
        # them from the kernel CRNG, which the agent has just reseeded with host entropy.
        r = sys.modules.get("random")
        if r is not None:
            r.seed()  # 2496 bytes from os.urandom
        npr = sys.modules.get("numpy.random")
        if npr is not None:
            try:
                import numpy

                npr.seed(numpy.frombuffer(os.urandom(32), dtype=numpy.uint32))
            except Exception:
                pass
        tf = sys.modules.get("tempfile")
        if tf is not None:
            tf._name_sequence = None

    def flush():
        for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                s.flush()
            except Exception:
                pass

    while True:
        req = read_request()
        if req.get("reseed"):
            status = 0
            try:
                reseed()
            except BaseException:
                status = 1
            try:
                os.write(4, ("%s %d\n" % (req["id"], status)).encode())
            except OSError:
                os._exit(status)
            continue
        saved = []
        for k, v in req.get("env") or []:
            saved.append((k, os.environ.get(k), v))
            os.environ[k] = v
        # The integer/string conversion limit is off (PYTHONINTMAXSTRDIGITS=0 from the
        # agent); an exec that sets the variable gets its value for that exec, and
        # sys.set_int_max_str_digits() in user code stays in force until changed.
        digits = None
        if "PYTHONINTMAXSTRDIGITS" in dict(req.get("env") or []):
            try:
                digits = (sys.get_int_max_str_digits(),)
                sys.set_int_max_str_digits(int(os.environ["PYTHONINTMAXSTRDIGITS"]))
            except (AttributeError, ValueError):
                digits = None
        src = req["code"]
        linecache.cache["<exec>"] = (len(src), None, src.splitlines(True), "<exec>")
        status = 0
        try:
            exec(compile(src, "<exec>", "exec"), g)
        except SystemExit as e:
            status = exit_status(e)
        except BaseException as e:
            try:
                traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            except Exception:
                pass
            status = 1
        if os.getpid() != pid:
            flush()
            os._exit(status)
        flush()
        if digits is not None:
            try:
                if sys.get_int_max_str_digits() == int(os.environ.get("PYTHONINTMAXSTRDIGITS", "-1")):
                    sys.set_int_max_str_digits(digits[0])
            except (AttributeError, ValueError):
                pass
        for k, old, v in saved:
            if os.environ.get(k) == v:
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
        try:
            os.write(4, ("%s %d\n" % (req["id"], status)).encode())
        except OSError:
            os._exit(status)


_sbx_repl()
