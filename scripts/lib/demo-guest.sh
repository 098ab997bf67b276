# /tapir/run for scripts/demo: the guest talks to its peer (10.77.0.1) through the macvtap.
set -e
peer=10.77.0.1
echo "--- guest: eth0"
ip addr show eth0
echo "--- guest: ping the peer"
ping -c 3 -W 2 "$peer"
echo "--- guest: download 20 MB from the peer's web server (peer -> guest)"
start=$(cut -d' ' -f1 /proc/uptime)
wget -q -O - "http://$peer/blob" | sha256sum | sed 's/ .*//; s/^/guest sha256 /'
end=$(cut -d' ' -f1 /proc/uptime)
echo "download took $(echo "$start $end" | awk '{printf "%.2f", $2 - $1}') s"
echo "--- guest: iperf3 to the peer, 3 s each way"
iperf3 -c "$peer" -t 3 -f m | grep -E 'sender|receiver'
iperf3 -c "$peer" -t 3 -f m -R | grep -E 'sender|receiver'
echo "--- guest: iperf3 UDP to the peer, 64-byte datagrams, 3 s"
iperf3 -c "$peer" -u -b 0 -l 64 -t 3 | grep -E 'receiver'
echo "--- guest: reach guest B (10.77.0.3), a second Tapir guest on a macvtap of the same lower device"
ping -c 3 -W 2 10.77.0.3
wget -q -O - http://10.77.0.3/hello | sed 's/^/guest B says: /'
