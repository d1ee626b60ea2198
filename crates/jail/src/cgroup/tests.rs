//! Unit tests of the cgroup module (a fake cgroupfs in temporary directories).
use super::*;
use config::ByteSize;

const MIB: u64 = 1 << 20;

/// A scratch directory standing in for a cgroupfs, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("fv-cgroup-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The files the kernel gives a cgroup directory (the root has no `cgroup.type`).
fn fake_cgroup(dir: &Path, controllers: &str, subtree_control: &str, is_root: bool) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
    fs::write(dir.join("cgroup.subtree_control"), subtree_control).unwrap();
    fs::write(dir.join("cgroup.procs"), "").unwrap();
    if !is_root {
        fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
    }
}

/// A VM cgroup with the cpu, memory and pids interface files at the kernel's defaults.
fn fake_vm_cgroup(dir: &Path) {
    fake_cgroup(dir, "cpu memory pids", "", false);
    for (f, v) in [
        ("cpu.weight", "100\n"),
        ("cpu.max", "max 100000\n"),
        ("memory.max", "max\n"),
        ("pids.max", "max\n"),
    ] {
        fs::write(dir.join(f), v).unwrap();
    }
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p).unwrap()
}

fn mounted_at(dir: &Path) -> Vec<Cgroup2Mount> {
    vec![Cgroup2Mount {
        root: PathBuf::from("/"),
        mount_point: dir.to_path_buf(),
    }]
}

fn root_with(controllers: Controllers) -> CgroupRoot {
    CgroupRoot::new("/fake".into(), "/fake/ferrovisor".into(), controllers, 4)
}

fn vm(cpus: u32, memory: u64) -> VmConfig {
    VmConfig {
        cpus,
        memory: ByteSize(memory),
        ..VmConfig::default()
    }
}

fn limits(
    cpu_weight: Option<u32>,
    cpu_max_percent: Option<u32>,
    memory_max: Option<u64>,
    pids_max: Option<u32>,
) -> Resources {
    Resources {
        cpu_weight,
        cpu_max_percent,
        memory_max: memory_max.map(ByteSize),
        pids_max,
    }
}

// ---- value validation ----

#[test]
fn no_limits_pass_even_without_controllers() {
    let cfg = vm(2, 512 * MIB);
    assert_eq!(
        root_with(Controllers::NONE).check(&Resources::default(), &cfg),
        Ok(())
    );
    let why = Unavailable::NoCgroup2;
    assert_eq!(check_without_cgroups(&Resources::default(), &why), Ok(()));
}

#[test]
fn cpu_weight_bounds() {
    let root = root_with(Controllers::ALL);
    let cfg = vm(1, 256 * MIB);
    for ok in [1, 100, CPU_WEIGHT_MAX] {
        assert_eq!(
            root.check(&limits(Some(ok), None, None, None), &cfg),
            Ok(())
        );
    }
    for bad in [0, CPU_WEIGHT_MAX + 1, u32::MAX] {
        let e = root
            .check(&limits(Some(bad), None, None, None), &cfg)
            .unwrap_err();
        assert_eq!(e.field(), "resources.cpu_weight");
        assert!(
            matches!(
                e,
                LimitError::OutOfRange {
                    min: 1,
                    max: 10_000,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("resources.cpu_weight") && msg.contains("1..=10000"),
            "{msg}"
        );
    }
}

#[test]
fn cpu_max_percent_bounds_follow_the_host_cpus() {
    let root = root_with(Controllers::ALL); // 4 host CPUs
    let cfg = vm(1, 256 * MIB);
    for ok in [1, 150, 400] {
        assert_eq!(
            root.check(&limits(None, Some(ok), None, None), &cfg),
            Ok(())
        );
    }
    for bad in [0, 401, u32::MAX] {
        let e = root
            .check(&limits(None, Some(bad), None, None), &cfg)
            .unwrap_err();
        assert_eq!(e.field(), "resources.cpu_max_percent");
        assert!(e.to_string().contains("4 host CPU"), "{e}");
    }
    let one = CgroupRoot::new("/f".into(), "/f/p".into(), Controllers::ALL, 1);
    assert!(one
        .check(&limits(None, Some(101), None, None), &cfg)
        .is_err());
    assert_eq!(
        one.check(&limits(None, Some(100), None, None), &cfg),
        Ok(())
    );
}

#[test]
fn memory_max_must_cover_guest_ram_and_the_vmm() {
    let root = root_with(Controllers::ALL);
    let cfg = vm(1, 512 * MIB);
    let min = 512 * MIB + MEMORY_OVERHEAD;
    for ok in [min, 4096 * MIB, u64::MAX] {
        assert_eq!(
            root.check(&limits(None, None, Some(ok), None), &cfg),
            Ok(())
        );
    }
    for bad in [0, 512 * MIB, min - 1] {
        let e = root
            .check(&limits(None, None, Some(bad), None), &cfg)
            .unwrap_err();
        assert_eq!(e.field(), "resources.memory_max");
        assert_eq!(
            e,
            LimitError::MemoryTooSmall {
                value: bad,
                guest: 512 * MIB
            }
        );
        assert!(e.to_string().contains("512M"), "{e}");
    }
    // A guest memory near u64::MAX does not overflow the bound.
    let huge = vm(1, u64::MAX - 1);
    assert!(root
        .check(&limits(None, None, Some(u64::MAX - 1), None), &huge)
        .is_err());
}

#[test]
fn pids_max_must_cover_the_vcpus() {
    let root = root_with(Controllers::ALL);
    let cfg = vm(4, 256 * MIB);
    for ok in [20, 64, PIDS_MAX_LIMIT] {
        assert_eq!(
            root.check(&limits(None, None, None, Some(ok)), &cfg),
            Ok(())
        );
    }
    for bad in [0, 1, 19, PIDS_MAX_LIMIT + 1] {
        let e = root
            .check(&limits(None, None, None, Some(bad)), &cfg)
            .unwrap_err();
        assert_eq!(e.field(), "resources.pids_max");
        assert!(matches!(e, LimitError::OutOfRange { min: 20, .. }), "{e:?}");
        assert!(e.to_string().contains("4 vCPU"), "{e}");
    }
}

#[test]
fn each_limit_needs_its_controller() {
    let cfg = vm(2, 512 * MIB);
    let cases = [
        (
            limits(Some(200), None, None, None),
            Controller::Cpu,
            "resources.cpu_weight",
        ),
        (
            limits(None, Some(50), None, None),
            Controller::Cpu,
            "resources.cpu_max_percent",
        ),
        (
            limits(None, None, Some(1024 * MIB), None),
            Controller::Memory,
            "resources.memory_max",
        ),
        (
            limits(None, None, None, Some(64)),
            Controller::Pids,
            "resources.pids_max",
        ),
    ];
    for (r, controller, field) in cases {
        let mut have = Controllers::ALL;
        assert_eq!(root_with(have).check(&r, &cfg), Ok(()));
        match controller {
            Controller::Cpu => have.cpu = false,
            Controller::Memory => have.memory = false,
            Controller::Pids => have.pids = false,
        }
        let e = root_with(have).check(&r, &cfg).unwrap_err();
        assert_eq!(e.field(), field);
        match &e {
            LimitError::Unavailable {
                controller: c,
                why: Unavailable::MissingControllers { missing, .. },
                ..
            } => {
                assert_eq!(*c, controller);
                assert_eq!(missing.iter().collect::<Vec<_>>(), vec![controller]);
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(field) && msg.contains(controller.name()),
            "{msg}"
        );

        let none = Unavailable::NoCgroup2;
        let e = check_without_cgroups(&r, &none).unwrap_err();
        assert_eq!(e.field(), field);
        assert!(e.to_string().contains("cgroups v1 only"), "{e}");
    }
}

#[test]
fn a_bad_value_is_reported_before_a_missing_controller() {
    let e = root_with(Controllers::NONE)
        .check(&limits(Some(0), None, None, None), &vm(1, 256 * MIB))
        .unwrap_err();
    assert!(matches!(e, LimitError::OutOfRange { .. }), "{e:?}");
}

#[test]
fn missing_controllers_are_reported() {
    assert_eq!(root_with(Controllers::ALL).missing_controllers(), None);
    let partial = root_with(Controllers {
        cpu: true,
        memory: false,
        pids: true,
    });
    let why = partial.missing_controllers().unwrap();
    assert_eq!(
        why,
        Unavailable::MissingControllers {
            mount: "/fake".into(),
            missing: Controllers {
                cpu: false,
                memory: true,
                pids: false
            }
        }
    );
    assert!(why.to_string().contains("the memory controller"), "{why}");
}

// ---- parsing ----

#[test]
fn controller_lists() {
    let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc\n");
    assert_eq!(c, Controllers::ALL);
    assert_eq!(Controllers::parse("hugetlb\n"), Controllers::NONE);
    assert_eq!(Controllers::parse(""), Controllers::NONE);
    let c = Controllers::parse("cpuset pids");
    assert_eq!(c.to_string(), "pids");
    assert_eq!(Controllers::ALL.to_string(), "cpu, memory, pids");
    assert_eq!(Controllers::NONE.to_string(), "none");
    assert_eq!(Controllers::ALL.without(c).to_string(), "cpu, memory");
}

/// This host's kind: cgroup v1 controllers, cgroup2 at `unified` with none of ours.
const HYBRID_MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const V2_MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
90 88 0:30 /system.slice/x.service /mnt/my\\040cgroup rw,relatime shared:9 - cgroup2 cgroup2 rw
";

#[test]
fn mountinfo_of_a_hybrid_host() {
    assert_eq!(
        parse_mountinfo(HYBRID_MOUNTINFO),
        vec![Cgroup2Mount {
            root: "/".into(),
            mount_point: "/sys/fs/cgroup/unified".into()
        }]
    );
}

#[test]
fn mountinfo_of_a_pure_v2_host() {
    assert_eq!(
        parse_mountinfo(V2_MOUNTINFO),
        vec![
            Cgroup2Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup".into()
            },
            // A bind-mounted subtree, its mount point with an escaped space.
            Cgroup2Mount {
                root: "/system.slice/x.service".into(),
                mount_point: "/mnt/my cgroup".into()
            },
        ]
    );
}

#[test]
fn mountinfo_without_cgroup2_and_odd_lines() {
    let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
    assert!(parse_mountinfo(v1).is_empty());
    assert!(parse_mountinfo("").is_empty());
    assert!(parse_mountinfo("garbage\n1 2 - cgroup2\n").is_empty());
    assert_eq!(unescape_mountinfo(r"a\040b\134c\777\09"), "a b\\c\\777\\09");
    let host = Host {
        mounts: &parse_mountinfo(v1),
        own: Some("/"),
        pid: 1,
        host_cpus: 1,
    };
    let e = setup(&host, None).unwrap_err();
    assert_eq!(e, Unavailable::NoCgroup2);
    let msg = e.to_string();
    assert!(msg.contains("cgroups v1 only"), "{msg}");
    assert!(msg.contains("systemd.unified_cgroup_hierarchy=1"), "{msg}");
}

#[test]
fn proc_self_cgroup() {
    let hybrid = "9:name=systemd:/\n4:memory:/process_api/86fc\n1:cpu:/\n0::/\n";
    assert_eq!(parse_proc_cgroup(hybrid).as_deref(), Some("/"));
    let v2 = "0::/system.slice/ferrovisor.service\n";
    assert_eq!(
        parse_proc_cgroup(v2).as_deref(),
        Some("/system.slice/ferrovisor.service")
    );
    assert_eq!(
        parse_proc_cgroup("0::/a/b (deleted)\n").as_deref(),
        Some("/a/b")
    );
    assert_eq!(parse_proc_cgroup("4:memory:/x\n1:cpu:/\n"), None);
}

#[test]
fn cpu_lists() {
    assert_eq!(parse_cpu_list("0-3\n"), Some(4));
    assert_eq!(parse_cpu_list("0\n"), Some(1));
    assert_eq!(parse_cpu_list("0-1,4,6-7\n"), Some(5));
    assert_eq!(parse_cpu_list(""), None);
    assert_eq!(parse_cpu_list("3-1"), None);
    assert_eq!(parse_cpu_list("x"), None);
    assert!(host_cpus() >= 1);
}

// ---- detection on a fake cgroupfs ----

#[test]
fn root_cgroup_daemon_uses_mount_ferrovisor_and_enables_controllers() {
    let s = Scratch::new("root");
    let mnt = s.0.join("mnt");
    fake_cgroup(&mnt, "cpuset cpu io memory hugetlb pids", "", true);
    // ferrovisor/ as the kernel shows it once it exists (mkdir on a plain directory
    // cannot make the interface files appear).
    fake_cgroup(&mnt.join("ferrovisor"), "cpu io memory pids", "", false);
    let host = Host {
        mounts: &mounted_at(&mnt),
        own: Some("/"),
        pid: 4242,
        host_cpus: 8,
    };
    let root = setup(&host, None).unwrap();
    assert_eq!(root.mount(), mnt);
    assert_eq!(root.parent(), mnt.join("ferrovisor"));
    assert_eq!(root.controllers(), Controllers::ALL);
    assert_eq!(root.host_cpus(), 8);
    assert_eq!(root.missing_controllers(), None);
    assert_eq!(
        read(mnt.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    assert_eq!(
        read(mnt.join("ferrovisor/cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    // The daemon stays in the root cgroup.
    assert_eq!(read(mnt.join("cgroup.procs")), "");
    assert!(!mnt.join("daemon").exists());

    // Already enabled: nothing is written.
    fs::write(mnt.join("cgroup.subtree_control"), "cpu memory pids io\n").unwrap();
    fs::write(mnt.join("ferrovisor/cgroup.subtree_control"), "cpu pids\n").unwrap();
    setup(&host, None).unwrap();
    assert_eq!(
        read(mnt.join("cgroup.subtree_control")),
        "cpu memory pids io\n"
    );
    assert_eq!(
        read(mnt.join("ferrovisor/cgroup.subtree_control")),
        "+memory"
    );
}

#[test]
fn hybrid_cgroup2_without_controllers_is_unavailable_and_untouched() {
    let s = Scratch::new("hybrid");
    let mnt = s.0.join("unified");
    fake_cgroup(&mnt, "hugetlb", "", true);
    let host = Host {
        mounts: &mounted_at(&mnt),
        own: Some("/"),
        pid: 4242,
        host_cpus: 2,
    };
    let e = setup(&host, None).unwrap_err();
    assert_eq!(
        e,
        Unavailable::MissingControllers {
            mount: mnt.clone(),
            missing: Controllers::ALL
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("cpu, memory, pids"), "{msg}");
    assert!(msg.contains("systemd.unified_cgroup_hierarchy=1"), "{msg}");
    assert!(msg.contains(&mnt.display().to_string()), "{msg}");
    assert!(!mnt.join("ferrovisor").exists());
    assert_eq!(read(mnt.join("cgroup.subtree_control")), "");
}

#[test]
fn partial_controllers_give_a_root_that_names_the_missing_ones() {
    let s = Scratch::new("partial");
    let mnt = s.0.join("mnt");
    fake_cgroup(&mnt, "cpu pids", "cpu pids", true);
    fake_cgroup(&mnt.join("ferrovisor"), "cpu pids", "", false);
    let host = Host {
        mounts: &mounted_at(&mnt),
        own: Some("/"),
        pid: 1,
        host_cpus: 2,
    };
    let root = setup(&host, None).unwrap();
    let want = Controllers {
        cpu: true,
        memory: false,
        pids: true,
    };
    assert_eq!(root.controllers(), want);
    let why = root.missing_controllers().unwrap();
    assert!(why.to_string().contains("memory"), "{why}");
    let e = root
        .check(&limits(None, None, Some(1 << 30), None), &vm(1, 512 * MIB))
        .unwrap_err();
    assert_eq!(e.field(), "resources.memory_max");
}

/// `/`, `/system.slice` and the service's cgroup, systemd-style, the service delegated.
fn fake_systemd(mnt: &Path) -> PathBuf {
    fake_cgroup(mnt, "cpuset cpu io memory pids", "cpu memory pids", true);
    fake_cgroup(
        &mnt.join("system.slice"),
        "cpu memory pids",
        "cpu memory pids",
        false,
    );
    let svc = mnt.join("system.slice/ferrovisor.service");
    fake_cgroup(&svc, "cpu memory pids", "", false);
    fs::write(svc.join("cgroup.procs"), "4242\n").unwrap();
    fake_cgroup(&svc.join("daemon"), "", "", false);
    fake_cgroup(&svc.join("vms"), "cpu memory pids", "", false);
    svc
}

#[test]
fn delegated_service_moves_itself_into_daemon_and_uses_vms() {
    let s = Scratch::new("delegated");
    let mnt = s.0.join("mnt");
    let svc = fake_systemd(&mnt);
    for own in [
        "/system.slice/ferrovisor.service",
        // Detected again once the daemon sits in `daemon`: the same layout.
        "/system.slice/ferrovisor.service/daemon",
    ] {
        let host = Host {
            mounts: &mounted_at(&mnt),
            own: Some(own),
            pid: 4242,
            host_cpus: 2,
        };
        let root = setup(&host, None).unwrap();
        assert_eq!(root.parent(), svc.join("vms"), "{own}");
        assert_eq!(root.controllers(), Controllers::ALL);
        assert_eq!(read(svc.join("daemon/cgroup.procs")), "4242");
        assert_eq!(
            read(svc.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(svc.join("vms/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        // systemd's levels already pass the controllers down: left alone.
        assert_eq!(read(mnt.join("cgroup.subtree_control")), "cpu memory pids");
        assert_eq!(
            read(mnt.join("system.slice/cgroup.subtree_control")),
            "cpu memory pids"
        );
    }
}

#[test]
fn own_cgroup_through_a_bind_mounted_subtree() {
    let s = Scratch::new("bind");
    let mnt = s.0.join("mnt");
    fake_cgroup(&mnt, "cpu memory pids", "", false);
    fake_cgroup(&mnt.join("daemon"), "", "", false);
    fake_cgroup(&mnt.join("vms"), "cpu memory pids", "", false);
    let mounts = vec![Cgroup2Mount {
        root: "/docker/abc".into(),
        mount_point: mnt.clone(),
    }];
    let host = Host {
        mounts: &mounts,
        own: Some("/docker/abc"),
        pid: 7,
        host_cpus: 2,
    };
    let root = setup(&host, None).unwrap();
    assert_eq!(root.parent(), mnt.join("vms"));
    assert_eq!(read(mnt.join("daemon/cgroup.procs")), "7");

    let elsewhere = Host {
        own: Some("/other"),
        ..host
    };
    let e = setup(&elsewhere, None).unwrap_err();
    assert!(matches!(e, Unavailable::OwnCgroup { .. }), "{e:?}");
    assert!(e.to_string().contains("/other"), "{e}");
}

#[test]
fn explicit_parent_is_created_inside_the_mount() {
    let s = Scratch::new("explicit");
    let mnt = s.0.join("mnt");
    fake_cgroup(&mnt, "cpu memory pids", "", true);
    fake_cgroup(&mnt.join("machines"), "cpu memory pids", "cpu", false);
    fake_cgroup(&mnt.join("machines/ferro"), "cpu memory pids", "", false);
    let mounts = mounted_at(&mnt);
    let host = Host {
        mounts: &mounts,
        own: None,
        pid: 1,
        host_cpus: 2,
    };
    let parent = mnt.join("machines/ferro");
    let root = setup(&host, Some(&parent)).unwrap();
    assert_eq!(root.parent(), parent);
    assert_eq!(root.controllers(), Controllers::ALL);
    assert_eq!(
        read(mnt.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    assert_eq!(
        read(mnt.join("machines/cgroup.subtree_control")),
        "+memory +pids"
    );
    assert_eq!(
        read(parent.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );

    // A new directory is created, but (a plain directory having no interface files) the
    // missing cgroup.controllers is reported by path.
    let fresh = mnt.join("machines/new");
    let e = setup(&host, Some(&fresh)).unwrap_err();
    assert!(fresh.is_dir());
    assert!(e.to_string().contains("new/cgroup.controllers"), "{e}");
    assert!(e.to_string().contains("ENOENT"), "{e}");

    for outside in [
        s.0.join("elsewhere"),
        PathBuf::from("relative/dir"),
        mnt.join("../mnt/x"),
    ] {
        let e = setup(&host, Some(&outside)).unwrap_err();
        assert_eq!(
            e,
            Unavailable::NotInCgroup2 {
                path: outside.clone()
            }
        );
        assert!(e.to_string().contains("cgroup2"), "{e}");
    }
}

#[test]
fn an_unwritable_subtree_control_names_the_path_and_errno() {
    let s = Scratch::new("unwritable");
    let mnt = s.0.join("mnt");
    fake_cgroup(&mnt, "cpu memory pids", "", true);
    fake_cgroup(&mnt.join("ferrovisor"), "cpu memory pids", "", false);
    let host = Host {
        mounts: &mounted_at(&mnt),
        own: Some("/"),
        pid: 1,
        host_cpus: 1,
    };
    let file = mnt.join("cgroup.subtree_control");

    // Readable but not writable, even for root: a sysfs attribute without a store method
    // (it reads "0-N", which names none of our controllers, so all three are written).
    fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/sys/devices/system/cpu/online", &file).unwrap();
    let e = setup(&host, None).unwrap_err();
    match &e {
        Unavailable::Io {
            path,
            action,
            errno,
            ..
        } => {
            assert_eq!(path, &file);
            assert_eq!(action, "write \"+cpu +memory +pids\"");
            assert!(
                matches!(*errno, Some(libc::EACCES | libc::EROFS)),
                "{errno:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(msg.contains("EACCES") || msg.contains("EROFS"), "{msg}");
    assert!(msg.contains("Delegate=yes"), "{msg}");

    // Unreadable: named too.
    fs::remove_file(&file).unwrap();
    fs::create_dir(&file).unwrap();
    let e = setup(&host, None).unwrap_err();
    assert!(
        matches!(&e, Unavailable::Io { path, errno: Some(libc::EISDIR), .. } if path == &file),
        "{e:?}"
    );
    assert!(e.to_string().contains("EISDIR"), "{e}");

    // The hints for the errnos of a cgroup that is not ours, or not empty.
    let denied = Unavailable::io(
        Path::new("/sys/fs/cgroup/x/cgroup.subtree_control"),
        "write \"+cpu\"",
        &io::Error::from_raw_os_error(libc::EACCES),
    );
    let msg = denied.to_string();
    assert!(
        msg.contains("/sys/fs/cgroup/x/cgroup.subtree_control"),
        "{msg}"
    );
    assert!(
        msg.contains("EACCES") && msg.contains("Delegate=yes"),
        "{msg}"
    );
    let busy = Unavailable::io(
        Path::new("/x/cgroup.subtree_control"),
        "write \"+cpu\"",
        &io::Error::from_raw_os_error(libc::EBUSY),
    );
    assert!(busy.to_string().contains("still holds processes"), "{busy}");
}

#[test]
fn detect_on_this_host_answers_without_panicking() {
    match CgroupRoot::detect(None) {
        Ok(root) => {
            assert!(!root.controllers().is_empty());
            eprintln!(
                "cgroups: {} under {}",
                root.controllers(),
                root.parent().display()
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            assert!(msg.contains("cgroup"), "{msg}");
            eprintln!("limits cannot be applied: {msg}");
        }
    }
}

// ---- VM cgroups on a fake cgroupfs ----

fn fake_root(s: &Scratch) -> CgroupRoot {
    let parent = s.0.join("ferrovisor");
    fake_cgroup(&parent, "cpu memory pids", "cpu memory pids", false);
    CgroupRoot::new(s.0.clone(), parent, Controllers::ALL, 4)
}

/// What the kernel does on rmdir of an empty cgroup: its interface files go with it.
fn kernel_clears(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
}

#[test]
fn create_stats_remove_round_trip() {
    let s = Scratch::new("vm");
    let root = fake_root(&s);
    let dir = root.parent().join("vm-0123abcd");
    fake_vm_cgroup(&dir);
    fs::write(dir.join("cpu.weight"), "500\n").unwrap(); // an earlier run's value
    let r = limits(None, Some(150), Some(1 << 30), Some(64));
    root.check(&r, &vm(2, 512 * MIB)).unwrap();

    let cg = root.create("0123abcd", &r).unwrap();
    assert_eq!(cg.path(), dir);
    assert_eq!(cg.procs_path(), dir.join("cgroup.procs"));
    assert_eq!(read(dir.join("cpu.weight")), "100"); // reset: not set this time
    assert_eq!(read(dir.join("cpu.max")), "150000 100000");
    assert_eq!(read(dir.join("memory.max")), "1073741824");
    assert_eq!(read(dir.join("pids.max")), "64");

    cg.add_pid(31337).unwrap();
    assert_eq!(read(cg.procs_path()), "31337");
    assert_eq!(cg.pids().unwrap(), vec![31337]);
    // Occupied: a second create refuses it.
    match root.create("0123abcd", &r) {
        Err(CgroupError::Busy { pids, .. }) => assert_eq!(pids, vec![31337]),
        other => panic!("{other:?}"),
    }

    assert_eq!(cg.stats(), CgroupStats::default());
    fs::write(dir.join("memory.current"), "123456789\n").unwrap();
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 987654\nuser_usec 600000\nsystem_usec 387654\n",
    )
    .unwrap();
    fs::write(dir.join("pids.current"), "5\n").unwrap();
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    assert_eq!(
        cg.stats(),
        CgroupStats {
            memory_current: Some(123456789),
            cpu_usage_usec: Some(987654),
            pids_current: Some(5),
            memory_events_oom_kill: Some(1),
        }
    );

    assert_eq!(root.open_existing("0123abcd").unwrap(), Some(cg.clone()));
    assert_eq!(root.open_existing("ffff").unwrap(), None);

    // A plain directory with files is not a cgroup the kernel would remove: reported.
    let e = cg.remove().unwrap_err();
    assert!(e.to_string().contains("vm-0123abcd"), "{e}");
    kernel_clears(&dir);
    cg.remove().unwrap();
    assert!(!dir.exists());
    cg.remove().unwrap(); // already gone: fine
    assert_eq!(root.open_existing("0123abcd").unwrap(), None);
}

#[test]
fn create_fresh_without_limits_and_a_failed_write_names_the_file() {
    let s = Scratch::new("fresh");
    let root = fake_root(&s);
    let cg = root.create("a1", &Resources::default()).unwrap();
    assert!(cg.path().is_dir());
    assert_eq!(fs::read_dir(cg.path()).unwrap().count(), 0); // nothing written

    // Without the kernel's interface files a write fails with the file's name, and the
    // directory this call created is removed again.
    let e = root
        .create("b2", &limits(None, None, None, Some(64)))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("vm-b2/pids.max") && msg.contains("\"64\""),
        "{msg}"
    );
    assert!(!root.parent().join("vm-b2").exists());
}

#[test]
fn a_reused_cgroup_keeps_only_this_runs_limits() {
    let s = Scratch::new("reuse");
    let root = fake_root(&s);
    let dir = root.parent().join("vm-c3");
    fake_vm_cgroup(&dir);
    for (f, v) in [
        ("cpu.weight", "7"),
        ("cpu.max", "5000 100000"),
        ("memory.max", "1"),
        ("pids.max", "20"),
    ] {
        fs::write(dir.join(f), v).unwrap();
    }
    root.create("c3", &Resources::default()).unwrap();
    assert_eq!(read(dir.join("cpu.weight")), "100");
    assert_eq!(read(dir.join("cpu.max")), "max");
    assert_eq!(read(dir.join("memory.max")), "max");
    assert_eq!(read(dir.join("pids.max")), "max");
    // A reused cgroup whose write fails is left in place (it was not ours to remove).
    fs::remove_file(dir.join("memory.max")).unwrap();
    let e = root
        .create("c3", &limits(None, None, Some(1 << 30), None))
        .unwrap_err();
    assert!(e.to_string().contains("memory.max"), "{e}");
    assert!(dir.is_dir());
}

#[test]
fn vm_ids_that_cannot_name_a_directory_are_refused() {
    let s = Scratch::new("ids");
    let root = fake_root(&s);
    for bad in ["", "..", ".x", "a/b", "a b", "ü", &"x".repeat(129)] {
        assert!(
            matches!(
                root.create(bad, &Resources::default()),
                Err(CgroupError::BadId(_))
            ),
            "{bad:?}"
        );
        assert!(matches!(
            root.open_existing(bad),
            Err(CgroupError::BadId(_))
        ));
    }
    assert_eq!(
        root.vm_path("0123456789abcdef0123456789abcdef").unwrap(),
        root.parent().join("vm-0123456789abcdef0123456789abcdef")
    );
}

#[test]
fn remove_retries_while_busy() {
    let busy = || io::Error::from_raw_os_error(libc::EBUSY);
    let mut calls = 0;
    rmdir_retrying(Path::new("/x/vm-a"), Duration::from_secs(5), |_| {
        calls += 1;
        if calls < 3 {
            Err(busy())
        } else {
            Ok(())
        }
    })
    .unwrap();
    assert_eq!(calls, 3);

    let e = rmdir_retrying(Path::new("/x/vm-a"), Duration::from_millis(50), |_| {
        Err(busy())
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("/x/vm-a") && msg.contains("still busy"),
        "{msg}"
    );

    let mut calls = 0;
    let e = rmdir_retrying(Path::new("/x/vm-a"), Duration::from_secs(5), |_| {
        calls += 1;
        Err(io::Error::from_raw_os_error(libc::EACCES))
    })
    .unwrap_err();
    assert_eq!(calls, 1, "only EBUSY is retried");
    assert!(e.to_string().contains("/x/vm-a"), "{e}");
}
