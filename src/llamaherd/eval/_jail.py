"""The sandbox's launcher: run as `python -I -S _jail.py CONFIG_JSON` by `sandbox.run_program`.

It imports nothing from llamaherd (it starts fast and single-threaded, which unshare(2) with a
user namespace requires). Steps, each a line below:
1. read the program (before the host's /tmp disappears from view);
2. new mount, network, PID, IPC and UTS namespaces (plus a user namespace when not root);
3. fork: the child is PID 1 of the new PID namespace, so when it ends every process it left
   behind (a fork bomb's) is killed by the kernel;
4. the child makes every mount read-only, mounts a fresh /proc, hides /root, /home, /run,
   /dev/shm and $HOME under empty read-only tmpfs, and mounts a size-limited tmpfs on /tmp,
   whose work/ directory is the only writable place; the Python installation and its virtual
   environment, if they lie in one of those places, are mounted back read-only;
5. resource limits, an unprivileged uid of its own (so RLIMIT_NPROC counts only its processes),
   no_new_privs, death with its parent, a bare environment; then exec the program.
The parent process here waits for the child and exits with its status (128 + signal if killed).

CONFIG_JSON keys: program (path), python, isolate (bool), limits {cpu, memory, nproc, fsize,
nofile, disk}. With isolate false only the resource limits of step 5 apply, under the caller's
own uid (the fallback; the caller warns): no process-count limit, no isolation.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 (generic table) alike
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

libc = ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def make_readonly():
    """Every mount read-only: one mount_setattr(2) call (Linux >= 5.12), else each mount in turn."""

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for m in mounts:  # fields: id parent major:minor root mountpoint options ...
        target = m[4].replace("\\040", " ")
        flags = sum(v for k, v in keep.items() if k in m[5].split(","))
        try:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            if target == "/":
                raise


def isolate(limits, keep):
    """Step 4 (in the new namespaces): the file system view. `keep` are directories the program
    needs (the Python installation and its virtual environment): where one lies inside a hidden
    directory (a venv under /tmp, $HOME or /home), it is mounted back read-only."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
    make_readonly()
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's
    except OSError:
        pass  # the host's /proc stays (read-only); its processes are visible but unreachable
    hidden = sorted(d for d in {"/root", "/home", "/run", "/dev/shm", os.path.expanduser("~")}
                    if d != "/" and os.path.isdir(d) and not inside(d, ["/tmp"]))
    hidden = [d for d in hidden if not inside(d, [h for h in hidden if h != d])]  # covered by a parent
    # Only what lies strictly inside a hidden directory (never a hidden directory itself).
    keep = sorted({k for k in keep if os.path.isdir(k) and any(k.startswith(d + "/") for d in hidden + ["/tmp"])})
    keep = [k for k in keep if not inside(k, [o for o in keep if o != k])]  # a parent brings it along
    # Hold each one by a file descriptor: it stays reachable (as /proc/self/fd/N) once its path
    # is covered, so it can be mounted back at the same path on top of the cover.
    held = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for k in keep]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits['disk']},mode=1777")
    for d in hidden:
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for k, fd in held:
        os.makedirs(k, exist_ok=True)  # on the cover, still writable
        mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
        os.close(fd)
        if not os.statvfs(k).f_flag & os.ST_RDONLY:  # a bind keeps its source's flags (read-only)
            raise OSError(0, f"{k} would be writable in the sandbox")
    for d in hidden:  # the program's own /tmp stays the only writable place
        mount(None, d, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def inside(path, dirs):
    """Whether `path` is one of `dirs` or lies under one."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def drop(uid, userns):
    """Step 5's identity: an unprivileged uid (a user namespace maps it when we are not root)."""
    if userns:
        check(libc.unshare(CLONE_NEWUSER), "unshare(user)")  # inner uid 65534 = our uid outside
        write("/proc/self/uid_map", "65534 0 1")
        write("/proc/self/setgroups", "deny")
        write("/proc/self/gid_map", "65534 0 1")
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
    elif os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def set_limits(limits):
    lim = {resource.RLIMIT_CPU: limits["cpu"], resource.RLIMIT_AS: limits["memory"],
           resource.RLIMIT_FSIZE: limits["fsize"], resource.RLIMIT_NOFILE: limits["nofile"],
           resource.RLIMIT_CORE: 0}
    for k, v in lim.items():
        resource.setrlimit(k, (v, v))


def python_dirs(python):
    """The directories a Python needs to start: its installation and its virtual environment
    (the venv's own directory holds pyvenv.cfg and the interpreter's link), as they are and as
    links resolve."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.dirname(python))}
    return sorted({os.path.realpath(d) for d in dirs} | {os.path.abspath(d) for d in dirs})


def main():
    cfg = json.loads(sys.argv[1])
    limits = cfg["limits"]
    with open(cfg["program"], encoding="utf-8") as f:
        code = f.read()
    uid = cfg["uid"]
    userns = False
    if cfg["isolate"]:
        userns = os.geteuid() != 0
        outer_uid, outer_gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        check(libc.unshare(flags | (CLONE_NEWUSER if userns else 0)), "unshare")
        if userns:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", f"0 {outer_uid} 1")
            write("/proc/self/gid_map", f"0 {outer_gid} 1")
        pid = os.fork()
        if pid:  # the waiting parent, outside the PID namespace
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        try:
            isolate(limits, python_dirs(cfg["python"]))
            work = "/tmp/work"
        except OSError as e:
            print(f"sandbox setup failed: {e}", file=sys.stderr)
            os._exit(125)
        libc.sethostname(b"sandbox", 7)
    else:
        work = cfg["workdir"]
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "main.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    set_limits(limits)
    if cfg["isolate"]:
        if os.geteuid() == 0 and not userns:
            os.chown(work, uid, uid)
            os.chown(path, uid, uid)
        # NPROC counts the processes of one uid (in its user namespace): the uid is this
        # sandbox's own, so the limit is about this program alone.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        drop(uid, userns)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(work)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], env)


if __name__ == "__main__":
    main()
