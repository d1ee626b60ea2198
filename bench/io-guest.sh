# shellcheck shell=sh
# The guest half of bench/io.sh (busybox sh in the nested guest, run as
# /scenario.sh with fv.action=script; bench/io.sh prepends the parameters:
# DD_MIB FIO_RUNTIME FIO_ENGINE IPERF_TIME HOST_IP GUEST_IP).
# Prints one line per measurement, which bench/io-lab.sh picks out of the
# console:
#
#   BENCH-R test=T rc=RC value=V     (T: seqwrite, seqread MB/s; randread IOPS; tcp Mbit/s)
#   BENCH-G key=value...             (what the guest sees: disk size, clock source, NIC)
#
# Rates are computed here, on the guest's clock (its clock source is printed:
# both VMMs' guests should use the same). MB = 10^6 bytes.
# shellcheck disable=SC3028  # busybox ash: $EPOCHREALTIME
# shellcheck disable=SC2154  # parameters are prepended by bench/io.sh

# rate BYTES T0 T1 -> MB/s
rate() { awk -v b="$1" -v a="$2" -v z="$3" 'BEGIN { d = z - a; if (d <= 0) print "NA"; else printf "%.1f\n", b / d / 1e6 }'; }

echo "BENCH-G disk_sectors=$(cat /sys/block/vda/size 2>/dev/null || echo NA) clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null) cpus=$(nproc)"

bytes=$((DD_MIB * 1048576))
# (a) sequential write: 1 MiB direct writes, then fsync (a flush request).
t0=$EPOCHREALTIME
dd if=/dev/zero of=/dev/vda bs=1M count="$DD_MIB" oflag=direct conv=fsync 2>/tmp/dd-w.err
rc=$?
t1=$EPOCHREALTIME
echo "BENCH-R test=seqwrite rc=$rc value=$(rate "$bytes" "$t0" "$t1")"
[ "$rc" = 0 ] || tail -n 3 /tmp/dd-w.err

# (b) sequential read: 1 MiB direct reads of what (a) wrote.
t0=$EPOCHREALTIME
dd if=/dev/vda of=/dev/null bs=1M count="$DD_MIB" iflag=direct 2>/tmp/dd-r.err
rc=$?
t1=$EPOCHREALTIME
echo "BENCH-R test=seqread rc=$rc value=$(rate "$bytes" "$t0" "$t1")"
[ "$rc" = 0 ] || tail -n 3 /tmp/dd-r.err

# (c) 4 KiB random reads, O_DIRECT, 16 in flight, over the whole disk.
if command -v fio >/dev/null; then
  fio --name=randread --filename=/dev/vda --ioengine="$FIO_ENGINE" --direct=1 \
    --rw=randread --bs=4k --iodepth=16 --runtime="$FIO_RUNTIME" --time_based \
    --thread --randrepeat=1 --norandommap --output-format=terse --terse-version=3 \
    > /tmp/fio.out 2>/tmp/fio.err
  rc=$?
  # Terse v3: field 8 is the read IOPS.
  iops=$(awk -F';' 'NR == 1 && NF > 8 { print $8 }' /tmp/fio.out)
  echo "BENCH-R test=randread rc=$rc value=${iops:-NA}"
  [ "$rc" = 0 ] || tail -n 3 /tmp/fio.err /tmp/fio.out
else
  echo "BENCH-R test=randread rc=127 value=NA"
fi

# (d) TCP guest -> host through the TAP, iperf3 (the lab runs the server).
ip link set eth0 up && ip addr add "$GUEST_IP/24" dev eth0
n=0
until ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; do
  n=$((n + 1)); [ $n -lt 60 ] || break
done
echo "BENCH-G net_ready_after=${n}s eth0_features=$(cat /sys/class/net/eth0/device/features 2>/dev/null)"
if command -v iperf3 >/dev/null; then
  iperf3 -c "$HOST_IP" -t "$IPERF_TIME" -f m --connect-timeout 10000 > /tmp/iperf.out 2>&1
  rc=$?
  # The receiver's summary line: "... <n> Mbits/sec ... receiver".
  mbit=$(awk '/receiver/ { for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i - 1) } END { if (v != "") print v }' /tmp/iperf.out)
  echo "BENCH-R test=tcp rc=$rc value=${mbit:-NA}"
  [ "$rc" = 0 ] || tail -n 3 /tmp/iperf.out
else
  echo "BENCH-R test=tcp rc=127 value=NA"
fi
