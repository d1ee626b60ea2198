//! Unit tests of the configuration: parsing, validation, the fields errors name.

use super::*;

const HOST: HostLimits = HostLimits {
    max_vcpus: 16,
    host_memory: 8 << 30,
};

#[test]
fn errors_name_their_field() {
    let dir = std::env::temp_dir().join(format!("fv-cfg-field-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("k");
    std::fs::write(
        &kernel,
        b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0",
    )
    .unwrap();
    let disk = dir.join("d.img");
    std::fs::write(&disk, [0u8; 512]).unwrap();
    let base = VmConfig {
        kernel: Some(kernel.clone()),
        ..VmConfig::default()
    };
    let field = |cfg: &VmConfig| cfg.validate(&HOST).unwrap_err().field();
    let two_disks = |second: &Path, id: Option<&str>| VmConfig {
        disks: vec![
            DiskConfig::from_str(disk.to_str().unwrap()).unwrap(),
            DiskConfig {
                path: second.to_path_buf(),
                id: id.map(str::to_string),
                ..DiskConfig::from_str("x").unwrap()
            },
        ],
        ..base.clone()
    };
    assert_eq!(
        field(&two_disks(&dir.join("missing"), None)).as_deref(),
        Some("disks[1].path")
    );
    assert_eq!(
        field(&two_disks(&disk, None)).as_deref(),
        Some("disks[1].path"),
        "the same image twice"
    );
    let long_id = "x".repeat(21);
    let mut cfg = two_disks(&dir.join("e.img"), Some(&long_id));
    std::fs::write(dir.join("e.img"), [0u8; 512]).unwrap();
    cfg.disks.swap(0, 1);
    assert_eq!(field(&cfg).as_deref(), Some("disks[0].id"));
    let cfg = VmConfig {
        cpus: 0,
        ..base.clone()
    };
    let e = cfg.validate(&HOST).unwrap_err();
    assert_eq!(e.field().as_deref(), Some("cpus"));
    assert_eq!(e.reason(), "a VM needs at least one vCPU");
    assert!(e.to_string().starts_with("--cpus 0"), "{e}");
    let cfg = VmConfig {
        nets: vec![
            NetConfig::from_str("tap=fv0").unwrap(),
            NetConfig::from_str("tap=fv0").unwrap(),
        ],
        ..base.clone()
    };
    assert_eq!(field(&cfg).as_deref(), Some("nets[1].tap"));
    let cfg = VmConfig {
        nets: vec![NetConfig::from_str("tap=a/b").unwrap()],
        ..base.clone()
    };
    assert_eq!(field(&cfg).as_deref(), Some("nets[0].tap"));
    let cfg = VmConfig {
        vsock: Some(VsockConfig::from_str("cid=2,socket=/tmp/x").unwrap()),
        ..base.clone()
    };
    assert_eq!(field(&cfg).as_deref(), Some("vsock.cid"));
    let cfg = VmConfig {
        initrd: Some(kernel.clone()),
        kernel: None,
        firmware: Some(disk.clone()),
        ..VmConfig::default()
    };
    assert_eq!(field(&cfg).as_deref(), Some("initrd"));
    let cfg = VmConfig {
        rng: true,
        balloon: Some(BalloonConfig::from_str("size=8G").unwrap()),
        ..base.clone()
    };
    assert_eq!(field(&cfg).as_deref(), Some("balloon.size"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn fake_bzimage() -> Vec<u8> {
    let mut v = vec![0u8; 0x400];
    v[0x1fe] = 0x55;
    v[0x1ff] = 0xaa;
    v[0x202..0x206].copy_from_slice(b"HdrS");
    v
}

#[test]
fn sizes_parse_and_print() {
    assert_eq!("512M".parse::<ByteSize>().unwrap().0, 512 << 20);
    assert_eq!("2G".parse::<ByteSize>().unwrap().0, 2 << 30);
    assert_eq!("2g".parse::<ByteSize>().unwrap().0, 2 << 30);
    assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
    assert_eq!("1KiB".parse::<ByteSize>().unwrap().0, 1024);
    for bad in [
        "",
        "M",
        "12X",
        "-1G",
        "1.5G",
        "99999999999999999999",
        "16777216T",
    ] {
        let e = bad.parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
    assert_eq!(ByteSize(512 << 20).to_string(), "512M");
    assert_eq!(ByteSize(3 << 30).to_string(), "3G");
    assert_eq!(ByteSize(1000).to_string(), "1000");
}

#[test]
fn serial_parses() {
    assert_eq!(
        "stdio".parse::<SerialConfig>().unwrap(),
        SerialConfig::Stdio
    );
    assert_eq!("null".parse::<SerialConfig>().unwrap(), SerialConfig::Null);
    assert_eq!(
        "file=/tmp/x".parse::<SerialConfig>().unwrap(),
        SerialConfig::File("/tmp/x".into())
    );
    assert_eq!(
        "socket=/tmp/s".parse::<SerialConfig>().unwrap(),
        SerialConfig::Socket("/tmp/s".into())
    );
    for bad in ["tty", "file=", "socket", ""] {
        assert!(bad.parse::<SerialConfig>().is_err(), "{bad}");
    }
}

#[test]
fn json_round_trip_and_unknown_fields() {
    let cfg: VmConfig = serde_json::from_str(
        r#"{"kernel":"/k","cpus":2,"memory":"1G","serial":"file=/tmp/o","cmdline":"quiet"}"#,
    )
    .unwrap();
    assert_eq!(cfg.cpus, 2);
    assert_eq!(cfg.memory.0, 1 << 30);
    let back: VmConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let bytes: VmConfig = serde_json::from_str(r#"{"kernel":"/k","memory":1073741824}"#).unwrap();
    assert_eq!(bytes.memory.0, 1 << 30);
    let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpu":2}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
    let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","memory":"lots"}"#).unwrap_err();
    assert!(e.to_string().contains("lots"), "{e}");
}

#[test]
fn validation_errors_name_the_value() {
    let k = tmpfile("bz", &fake_bzimage());
    let base = VmConfig {
        kernel: Some(k.clone()),
        ..Default::default()
    };
    assert_eq!(base.validate(&HOST).unwrap(), Some(KernelFormat::BzImage));

    let e = VmConfig {
        cpus: 0,
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::NoCpus));
    let e = VmConfig {
        cpus: 17,
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(
        e.to_string().contains("17") && e.to_string().contains("16"),
        "{e}"
    );
    let e = VmConfig {
        memory: ByteSize(16 << 30),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(
        e.to_string().contains("16G") && e.to_string().contains("8G"),
        "{e}"
    );
    let e = VmConfig {
        memory: ByteSize(1 << 20),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(e.to_string().contains("1M"), "{e}");
    let e = VmConfig {
        memory: ByteSize((64 << 20) + 1),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::MemoryUnaligned(_)));

    let missing = PathBuf::from("/nonexistent/vmlinuz");
    let e = VmConfig {
        kernel: Some(missing.clone()),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert_eq!(e.to_string(), "kernel /nonexistent/vmlinuz: no such file");

    let junk = tmpfile("junk", b"this is not a kernel");
    let e = VmConfig {
        kernel: Some(junk.clone()),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(e.to_string().contains("not a Linux kernel"), "{e}");

    let e = VmConfig {
        initrd: Some(missing),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(e.to_string().starts_with("initrd /nonexistent"), "{e}");

    let e = VmConfig {
        cmdline: "x".repeat(4000),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::CmdlineTooLong { .. }));

    let e = VmConfig {
        kernel: None,
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::NothingToBoot));

    let sock = tmpfile("sock-taken", b"");
    let e = VmConfig {
        serial: SerialConfig::Socket(sock),
        ..base.clone()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::SerialSocketExists(_)));
}

#[test]
fn firmware_validation() {
    let fw = tmpfile("fw", &[0xf4; 4096]);
    let cfg = VmConfig {
        firmware: Some(fw.clone()),
        ..Default::default()
    };
    assert_eq!(cfg.validate(&HOST).unwrap(), None);
    let odd = tmpfile("fw-odd", &[0xf4; 100]);
    let e = VmConfig {
        firmware: Some(odd),
        ..Default::default()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::FirmwareSize { size: 100, .. }));
    let e = VmConfig {
        firmware: Some(fw),
        kernel: Some("/k".into()),
        ..Default::default()
    }
    .validate(&HOST)
    .unwrap_err();
    assert!(matches!(e, ConfigError::KernelAndFirmware));
}

#[test]
fn recognises_kernel_formats() {
    assert_eq!(format_of(&fake_bzimage()), Some(KernelFormat::BzImage));
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18] = 62;
    assert_eq!(format_of(&elf), Some(KernelFormat::Elf));
    elf[18] = 183; // aarch64
    assert_eq!(format_of(&elf), None);
    assert_eq!(format_of(b"short"), None);
}

#[test]
fn memory_option_and_hugepages() {
    let m: MemoryOption = "512M".parse().unwrap();
    assert_eq!((m.size.0, m.hugepages), (512 << 20, None));
    let m: MemoryOption = "1G,hugepages=on".parse().unwrap();
    assert_eq!((m.size.0, m.hugepages), (1 << 30, Some(HugePages::On)));
    for (s, hp) in [
        ("2M,hugepages=off", HugePages::Off),
        ("2M,hugepages=auto", HugePages::Auto),
    ] {
        assert_eq!(s.parse::<MemoryOption>().unwrap().hugepages, Some(hp));
    }
    let e = "512M,hugepages=maybe".parse::<MemoryOption>().unwrap_err();
    assert_eq!(e.field().as_deref(), Some("hugepages"));
    assert!(e.to_string().contains("hugepages=maybe"), "{e}");
    let e = "512M,huge=on".parse::<MemoryOption>().unwrap_err();
    assert!(e.to_string().contains("unknown option \"huge=on\""), "{e}");
    assert!(matches!(
        "lots,hugepages=on".parse::<MemoryOption>(),
        Err(ConfigError::Size(_))
    ));
    // JSON: `hugepages` beside `memory`; the default is left out when written.
    let cfg: VmConfig = serde_json::from_str(r#"{"kernel":"/k","hugepages":"on"}"#).unwrap();
    assert_eq!(cfg.hugepages, HugePages::On);
    let auto: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
    assert_eq!(auto.hugepages, HugePages::Auto);
    assert!(!serde_json::to_string(&auto).unwrap().contains("hugepages"));
    let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","hugepages":"yes"}"#).unwrap_err();
    assert!(e.to_string().contains("yes"), "{e}");
}

#[test]
fn irqchip_parses() {
    assert_eq!("split".parse::<Irqchip>().unwrap(), Irqchip::Split);
    assert_eq!("kernel".parse::<Irqchip>().unwrap(), Irqchip::Kernel);
    let e = "userspace".parse::<Irqchip>().unwrap_err();
    assert_eq!(e.field().as_deref(), Some("irqchip"));
    assert!(e.to_string().contains("split or kernel"), "{e}");
    let cfg: VmConfig = serde_json::from_str(r#"{"kernel":"/k","irqchip":"kernel"}"#).unwrap();
    assert_eq!(cfg.irqchip, Irqchip::Kernel);
    assert_eq!(VmConfig::default().irqchip, Irqchip::Split);
    assert!(!serde_json::to_string(&VmConfig::default())
        .unwrap()
        .contains("irqchip"));
}
