//! Lab: the stock Debian kernel's own virtio drivers doing real work on Ferrovisor's devices —
//! block (a pattern and an ext2 file written, fsync'ed and read back on the host; a read-only
//! disk; several disks), net (ping and a TCP transfer to the host through a TAP), vsock (1 MiB
//! echoed both ways through the hybrid Unix socket, with socat as the Firecracker-era tool on
//! both ends), balloon (inflating shrinks the VMM's RSS) and virtio-console — each with the
//! VMM confined (`run --jail`: every wall up).

mod common;

use common::lab::{field, lab_available, run_scenario, LabRun};
use std::path::PathBuf;
use std::time::Duration;

fn guest_file(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Every scenario runs its VMM confined, as the daemon runs them: every wall up (namespaces,
/// pivot_root into /tmp, a uid of its own without capabilities, seccomp, Landlock), so the
/// devices are proven to work behind them.
fn run(name: &str, scenario: &str, adds: &[(PathBuf, &str)]) -> LabRun {
    let jailed = format!(
        "export FV_RUN_FLAGS='--jail --jail-uid 900123 --jail-dir /tmp --require landlock'\n{scenario}"
    );
    let lab = run_scenario(name, &jailed, adds, Duration::from_secs(900));
    let out = &lab.output.stdout;
    for wall in [
        "namespaces: up",
        "filesystem: up",
        "identity: up",
        "landlock: up",
        "seccomp: up",
    ] {
        assert!(
            out.contains(wall),
            "{name}: the VMM ran without {wall}:\n{out}"
        );
    }
    lab
}

const BLOCK_GUEST: &str = r#"
echo "FV-BLK disks=$(ls -d /sys/block/vd* | wc -l) serial=$(cat /sys/block/vda/serial) ro_c=$(cat /sys/block/vdc/ro) ro_a=$(cat /sys/block/vda/ro)"
yes ferrovisor-block-pattern | head -c 4194304 > /tmp/pattern
# The pattern at 1 MiB on the raw disk, synced to the device.
dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null; echo "FV-BLK pattern-write rc=$?"
echo "FV-BLK guest-md5=$(dd if=/dev/vda bs=1M skip=1 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
# Discard the first MiB (it held a marker the host wrote): the host must read zeros there.
blkdiscard -o 0 -l 1048576 /dev/vda; echo "FV-BLK discard rc=$?"
# A filesystem on the second disk, a file written and fsync'ed, unmounted.
mke2fs -q /dev/vdb && mkdir -p /mnt && mount -t ext2 /dev/vdb /mnt; echo "FV-BLK mount rc=$?"
echo "hello from the ferrovisor guest" > /tmp/msg
dd if=/tmp/msg of=/mnt/hello.txt conv=fsync 2>/dev/null; echo "FV-BLK fsync rc=$?"
umount /mnt; echo "FV-BLK umount rc=$?"
# The read-only disk refuses writes.
dd if=/tmp/msg of=/dev/vdc bs=512 count=1 conv=fsync 2>/tmp/ro.err; echo "FV-BLK ro-write rc=$? err=$(tr ' ' '_' < /tmp/ro.err | head -n1)"
echo "FV-BLK ro-read=$(head -c 17 /dev/vdc)"
"#;

const BLOCK_LAB: &str = r#"
truncate -s 64M /tmp/raw.img
printf 'MARKER-TO-DISCARD' | dd of=/tmp/raw.img conv=notrunc 2>/dev/null
truncate -s 32M /tmp/fs.img
dd if=/dev/zero of=/tmp/ro.img bs=1M count=4 2>/dev/null
printf 'READONLY-ORIGINAL' | dd of=/tmp/ro.img conv=notrunc 2>/dev/null
lab-guest-initrd /blk-guest.sh /tmp/blk-initrd.cpio.gz
fv blk --kernel "$GUEST_VMLINUX" --initrd /tmp/blk-initrd.cpio.gz --cpus 2 --memory 512M \
  --disk path=/tmp/raw.img,id=fv-raw-disk --disk /tmp/fs.img --disk path=/tmp/ro.img,readonly=on \
  --cmdline "quiet fv.action=script"
echo "HOST-BLK expected-md5=$(yes ferrovisor-block-pattern | head -c 4194304 | md5sum | cut -d' ' -f1) host-md5=$(dd if=/tmp/raw.img bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "HOST-BLK first-mib-nonzero=$(head -c 1048576 /tmp/raw.img | tr -d '\000' | wc -c)"
echo "HOST-BLK file=$(debugfs -R 'cat /hello.txt' /tmp/fs.img 2>/dev/null | tr ' ' '_')"
echo "HOST-BLK ro=$(head -c 17 /tmp/ro.img)"
"#;

#[test]
fn block_devices_write_fsync_and_read_back_on_the_host() {
    if !lab_available("block_devices_write_fsync_and_read_back_on_the_host") {
        return;
    }
    let dir = common::scratch("blk-guest");
    let guest = guest_file(&dir, "blk-guest.sh", BLOCK_GUEST);
    let lab = run(
        "blk",
        BLOCK_LAB,
        &[
            (guest, "/blk-guest.sh"),
            (PathBuf::from("/usr/sbin/debugfs"), "/usr/sbin/debugfs"),
        ],
    );
    let s = lab.section("blk");
    let t = &s.text;
    assert_eq!(s.exit, 0, "{t}");
    assert_eq!(field(t, "FV-BLK disks=", "disks"), Some("3"), "{t}");
    assert_eq!(
        field(t, "FV-BLK disks=", "serial"),
        Some("fv-raw-disk"),
        "{t}"
    );
    assert_eq!(field(t, "FV-BLK disks=", "ro_c"), Some("1"), "{t}");
    assert_eq!(field(t, "FV-BLK disks=", "ro_a"), Some("0"), "{t}");
    assert_eq!(field(t, "pattern-write", "rc"), Some("0"), "{t}");
    assert_eq!(field(t, "FV-BLK discard", "rc"), Some("0"), "{t}");
    assert_eq!(field(t, "FV-BLK mount", "rc"), Some("0"), "{t}");
    assert_eq!(field(t, "FV-BLK fsync", "rc"), Some("0"), "{t}");
    assert_eq!(field(t, "FV-BLK umount", "rc"), Some("0"), "{t}");
    assert_ne!(field(t, "FV-BLK ro-write", "rc"), Some("0"), "{t}");
    assert!(t.contains("FV-BLK ro-read=READONLY-ORIGINAL"), "{t}");
    let out = &lab.output.stdout;
    let expected = field(out, "HOST-BLK expected-md5", "expected-md5").unwrap();
    assert_eq!(
        field(out, "HOST-BLK expected-md5", "host-md5"),
        Some(expected),
        "{out}"
    );
    assert_eq!(
        field(t, "FV-BLK guest-md5", "guest-md5"),
        Some(expected),
        "{t}"
    );
    assert_eq!(
        field(out, "HOST-BLK first-mib", "first-mib-nonzero"),
        Some("0"),
        "the discarded MiB reads back as zeros on the host"
    );
    assert!(
        out.contains("HOST-BLK file=hello_from_the_ferrovisor_guest"),
        "{out}"
    );
    assert!(out.contains("HOST-BLK ro=READONLY-ORIGINAL"), "{out}");
    eprintln!(
        "VERDICT lab virtio-blk: PASS (3 disks, 4 MiB pattern md5 {expected} on host, ext2 file read back with debugfs, read-only refused, discard zeroed, {} ms)",
        s.ms
    );
}

const NET_GUEST: &str = r#"
ip link set eth0 up && ip addr add 169.254.77.2/24 dev eth0
echo "FV-NET mac=$(cat /sys/class/net/eth0/address)"
n=0
until ping -c 1 -W 1 169.254.77.1 >/dev/null 2>&1; do
  n=$((n + 1)); [ $n -lt 60 ] || break
done
ping -c 3 -W 2 169.254.77.1 > /tmp/ping.out 2>&1; echo "FV-NET ping rc=$? $(grep -o '[0-9]* packets received' /tmp/ping.out | tr ' ' '_')"
yes ferrovisor-net-payload | head -c 8388608 > /tmp/payload
echo "FV-NET sent-md5=$(md5sum < /tmp/payload | cut -d' ' -f1)"
# The host answers with the md5 of what it received once it has it all: the guest cannot power
# off with data still in its send queue.
socat -t 60 - TCP:169.254.77.1:5001,connect-timeout=10 < /tmp/payload > /tmp/ack; echo "FV-NET tcp rc=$? ack=$(cat /tmp/ack)"
echo "FV-NET features=$(cat /sys/class/net/eth0/device/features 2>/dev/null)"
"#;

const NET_LAB: &str = r#"
lab-guest-initrd /net-guest.sh /tmp/net-initrd.cpio.gz /usr/bin/socat
socat -t 30 TCP-LISTEN:5001,reuseaddr SYSTEM:'cat >/tmp/received && md5sum </tmp/received | head -c 32' &
listener=$!
fv net --kernel "$GUEST_VMLINUX" --initrd /tmp/net-initrd.cpio.gz --cpus 2 --memory 512M \
  --net tap=fvtap0,mac=52:54:00:fe:00:02,id=nic0 --cmdline "quiet fv.action=script" &
fvjob=$!
# The VMM creates fvtap0 and brings it up; the host side gets its address.
n=0; until [ -e /sys/class/net/fvtap0 ] || [ $n -gt 300 ]; do sleep 0.1; n=$((n + 1)); done
ip addr add 169.254.77.1/24 dev fvtap0
echo "HOST-NET tap=$(cat /sys/class/net/fvtap0/operstate 2>/dev/null) flags=$(cat /sys/class/net/fvtap0/flags)"
wait $fvjob
sleep 1
kill $listener 2>/dev/null
echo "HOST-NET received-md5=$(md5sum < /tmp/received | cut -d' ' -f1) bytes=$(wc -c < /tmp/received)"
"#;

#[test]
fn net_pings_and_sends_tcp_to_the_host_through_a_tap() {
    if !lab_available("net_pings_and_sends_tcp_to_the_host_through_a_tap") {
        return;
    }
    let dir = common::scratch("net-guest");
    let guest = guest_file(&dir, "net-guest.sh", NET_GUEST);
    let adds = [
        (guest, "/net-guest.sh"),
        (PathBuf::from("/usr/bin/socat"), "/usr/bin/socat"),
    ];
    let lab = run("net", NET_LAB, &adds);
    let s = lab.section("net");
    let t = &s.text;
    assert_eq!(s.exit, 0, "{t}");
    assert_eq!(
        field(t, "FV-NET mac", "mac"),
        Some("52:54:00:fe:00:02"),
        "{t}"
    );
    assert_eq!(field(t, "FV-NET ping", "rc"), Some("0"), "{t}");
    assert!(t.contains("3_packets_received"), "{t}");
    assert_eq!(field(t, "FV-NET tcp", "rc"), Some("0"), "{t}");
    let sent = field(t, "FV-NET sent-md5", "sent-md5").unwrap();
    assert_eq!(field(t, "FV-NET tcp", "ack"), Some(sent), "{t}");
    let out = &lab.output.stdout;
    assert_eq!(
        field(out, "HOST-NET received-md5", "received-md5"),
        Some(sent),
        "{out}"
    );
    assert_eq!(
        field(out, "HOST-NET received-md5", "bytes"),
        Some("8388608")
    );
    eprintln!(
        "VERDICT lab virtio-net: PASS (ping 3/3, 8 MiB over TCP guest->host md5 {sent}, {} ms)",
        s.ms
    );
}

const VSOCK_GUEST: &str = r#"
yes ferrovisor-vsock-data | head -c 1048576 > /tmp/data
echo "FV-VSOCK data-md5=$(md5sum < /tmp/data | cut -d' ' -f1)"
# guest -> host: the host echoes on port 5000 (its Unix socket <path>_5000).
socat -t 30 - VSOCK-CONNECT:2:5000 < /tmp/data > /tmp/echo; echo "FV-VSOCK g2h rc=$?"
echo "FV-VSOCK g2h-md5=$(md5sum < /tmp/echo | cut -d' ' -f1) bytes=$(wc -c < /tmp/echo)"
# host -> guest: echo one connection on port 1234, then finish.
echo "FV-VSOCK listening"
timeout 120 socat -t 30 VSOCK-LISTEN:1234 EXEC:cat; echo "FV-VSOCK h2g-server rc=$?"
"#;

const VSOCK_LAB: &str = r#"
lab-guest-initrd /vsock-guest.sh /tmp/vsock-initrd.cpio.gz /usr/bin/socat
yes ferrovisor-vsock-data | head -c 1048576 > /tmp/data
# mode 0666: the confined VMM connects as its own uid.
socat -t 30 UNIX-LISTEN:/tmp/fv.vsock_5000,fork,mode=0666 EXEC:cat &
echoer=$!
fv vsock --kernel "$GUEST_VMLINUX" --initrd /tmp/vsock-initrd.cpio.gz --cpus 2 --memory 512M \
  --vsock cid=42,socket=/tmp/fv.vsock --cmdline "quiet fv.action=script" &
fvjob=$!
n=0
until grep -q "FV-VSOCK listening" /tmp/fv-vsock.out 2>/dev/null || [ $n -gt 1200 ]; do sleep 0.1; n=$((n + 1)); done
# Firecracker's host-initiated protocol: "CONNECT <port>\n", answered "OK <hostport>\n".
try=0
while [ $try -lt 20 ]; do
  (printf 'CONNECT 1234\n'; cat /tmp/data; sleep 5) | socat -t 20 - UNIX-CONNECT:/tmp/fv.vsock > /tmp/h2g.out
  head -n 1 /tmp/h2g.out | grep -q '^OK ' && break
  try=$((try + 1)); sleep 0.5
done
echo "HOST-VSOCK first-line=$(head -n 1 /tmp/h2g.out | tr ' ' '_') h2g-md5=$(tail -n +2 /tmp/h2g.out | md5sum | cut -d' ' -f1) bytes=$(tail -n +2 /tmp/h2g.out | wc -c) tries=$try"
wait $fvjob
kill $echoer 2>/dev/null
echo "HOST-VSOCK socket-left=$(ls /tmp/fv.vsock 2>/dev/null | wc -l)"
"#;

#[test]
fn vsock_echoes_a_mebibyte_both_ways_through_the_hybrid_socket() {
    if !lab_available("vsock_echoes_a_mebibyte_both_ways_through_the_hybrid_socket") {
        return;
    }
    let dir = common::scratch("vsock-guest");
    let guest = guest_file(&dir, "vsock-guest.sh", VSOCK_GUEST);
    let lab = run(
        "vsock",
        VSOCK_LAB,
        &[
            (guest, "/vsock-guest.sh"),
            (PathBuf::from("/usr/bin/socat"), "/usr/bin/socat"),
        ],
    );
    let s = lab.section("vsock");
    let t = &s.text;
    assert_eq!(s.exit, 0, "{t}");
    let md5 = field(t, "FV-VSOCK data-md5", "data-md5").unwrap();
    assert_eq!(field(t, "FV-VSOCK g2h rc", "rc"), Some("0"), "{t}");
    assert_eq!(field(t, "FV-VSOCK g2h-md5", "g2h-md5"), Some(md5), "{t}");
    assert_eq!(
        field(t, "FV-VSOCK g2h-md5", "bytes"),
        Some("1048576"),
        "{t}"
    );
    let out = &lab.output.stdout;
    let first = field(out, "HOST-VSOCK first-line", "first-line").unwrap_or_default();
    assert!(first.starts_with("OK_"), "{out}");
    assert_eq!(
        field(out, "HOST-VSOCK first-line", "h2g-md5"),
        Some(md5),
        "{out}"
    );
    assert_eq!(
        field(out, "HOST-VSOCK first-line", "bytes"),
        Some("1048576")
    );
    assert_eq!(
        field(out, "HOST-VSOCK socket-left", "socket-left"),
        Some("0")
    );
    eprintln!(
        "VERDICT lab virtio-vsock: PASS (1 MiB guest->host->guest and host->guest->host, md5 {md5}, {} ms)",
        s.ms
    );
}

const BALLOON_GUEST: &str = r#"
mkdir -p /fill && mount -t tmpfs -o size=500m tmpfs /fill
dd if=/dev/zero of=/fill/x bs=1M count=384 2>/dev/null; echo "FV-BALLOON fill rc=$?"
rm /fill/x; umount /fill
echo "virtio-console says hello" > /dev/hvc0; echo "FV-CONSOLE rc=$?"
echo "FV-BALLOON filled"
# Hold while the host inflates; the host stops the VM through the control socket.
n=0; while [ $n -lt 240 ]; do sleep 1; n=$((n + 1)); done
"#;

const BALLOON_LAB: &str = r#"
lab-guest-initrd /balloon-guest.sh /tmp/balloon-initrd.cpio.gz
fv balloon --kernel "$GUEST_VMLINUX" --initrd /tmp/balloon-initrd.cpio.gz --cpus 2 --memory 768M \
  --balloon stats=1 --console file=/tmp/hvc0.out --control /tmp/fv.ctl --cmdline "quiet fv.action=script" &
fvjob=$!
n=0
until grep -q "FV-BALLOON filled" /tmp/fv-balloon.out 2>/dev/null || [ $n -gt 1200 ]; do sleep 0.1; n=$((n + 1)); done
rss() { ferrovisor ctl /tmp/fv.ctl stats | sed -n 's/.*"rss_bytes": \([0-9]*\).*/\1/p'; }
actual() { ferrovisor ctl /tmp/fv.ctl stats | tr -d '\n ' | sed -n 's/.*"actual":\([0-9]*\).*/\1/p'; }
before=$(rss)
ferrovisor ctl /tmp/fv.ctl balloon 512M > /tmp/balloon-set.out; setrc=$?
n=0
until [ "$(actual)" -ge 536870912 ] 2>/dev/null || [ $n -gt 600 ]; do sleep 0.1; n=$((n + 1)); done
after=$(rss)
echo "HOST-BALLOON set-rc=$setrc before=$before after=$after actual=$(actual)"
ferrovisor ctl /tmp/fv.ctl stats | tr -d '\n' | sed 's/  */ /g' | head -c 3000; echo
ferrovisor ctl /tmp/fv.ctl balloon 0 >/dev/null
ferrovisor ctl /tmp/fv.ctl stop >/dev/null
wait $fvjob
echo "HOST-CONSOLE $(cat /tmp/hvc0.out | tr ' ' '_')"

# Free page reporting: the guest reports what it freed by itself, no inflation.
fv reporting --kernel "$GUEST_VMLINUX" --initrd /tmp/balloon-initrd.cpio.gz --cpus 2 --memory 768M \
  --balloon free-page-reporting=on --console null --control /tmp/fv2.ctl --cmdline "quiet fv.action=script" &
fvjob=$!
n=0
until grep -q "FV-BALLOON filled" /tmp/fv-reporting.out 2>/dev/null || [ $n -gt 1200 ]; do sleep 0.1; n=$((n + 1)); done
reported() { ferrovisor ctl /tmp/fv2.ctl stats | tr -d '\n ' | sed -n 's/.*"reported_bytes":\([0-9]*\).*/\1/p'; }
rss2() { ferrovisor ctl /tmp/fv2.ctl stats | sed -n 's/.*"rss_bytes": \([0-9]*\).*/\1/p'; }
# Linux reports freed memory in 2 MiB blocks a couple of seconds after it is freed (and all
# free memory once at boot): wait for the RSS to come down, at most 60 s.
n=0
until [ "$(rss2)" -lt 314572800 ] 2>/dev/null || [ $n -gt 120 ]; do sleep 0.5; n=$((n + 1)); done
echo "HOST-REPORTING reported=$(reported) rss=$(rss2) waited_halfsecs=$n"
ferrovisor ctl /tmp/fv2.ctl stop >/dev/null
wait $fvjob
"#;

#[test]
fn balloon_inflation_shrinks_the_vmm_rss_and_virtio_console_carries_output() {
    if !lab_available("balloon_inflation_shrinks_the_vmm_rss_and_virtio_console_carries_output") {
        return;
    }
    let dir = common::scratch("balloon-guest");
    let guest = guest_file(&dir, "balloon-guest.sh", BALLOON_GUEST);
    let lab = run("balloon", BALLOON_LAB, &[(guest, "/balloon-guest.sh")]);
    let s = lab.section("balloon");
    let t = &s.text;
    assert_eq!(s.exit, 0, "{t}");
    assert_eq!(field(t, "FV-BALLOON fill", "rc"), Some("0"), "{t}");
    let out = &lab.output.stdout;
    let num = |k: &str| -> u64 {
        field(out, "HOST-BALLOON", k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in:\n{out}"))
    };
    assert_eq!(num("set-rc"), 0, "{out}");
    let (before, after, actual) = (num("before"), num("after"), num("actual"));
    assert!(actual >= 512 << 20, "the guest gave 512M: {out}");
    assert!(
        before > after + (256 << 20),
        "the VMM's RSS should drop by well over 256 MiB after the guest filled and freed 384 MiB \
and gave 512 MiB to the balloon: before {before}, after {after}\n{out}"
    );
    assert!(
        out.contains("\"stats_updates\"") && out.contains("\"free_memory\""),
        "the guest's memory statistics reach the host: {out}"
    );
    assert!(
        out.contains("HOST-CONSOLE virtio-console_says_hello"),
        "{out}"
    );
    let reported: u64 = field(out, "HOST-REPORTING", "reported")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rss: u64 = field(out, "HOST-REPORTING", "rss")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        reported >= 256 << 20,
        "free page reporting returns what the guest freed: {out}"
    );
    assert!(
        rss < 300 << 20,
        "after reporting, the VMM holds little of the 384 MiB the guest touched and freed: {out}"
    );
    eprintln!(
        "VERDICT lab virtio-balloon free page reporting: PASS ({} MiB reported, RSS {} MiB)",
        reported >> 20,
        rss >> 20
    );
    eprintln!(
        "VERDICT lab virtio-balloon: PASS (RSS {} MiB -> {} MiB with 512 MiB ballooned, guest stats received); virtio-console: PASS",
        before >> 20,
        after >> 20
    );
}
