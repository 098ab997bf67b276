# /tapir/run for the first part of scripts/demo: the guest booted by Tapir says what it sees.
echo "--- guest: $(grep -c ^processor /proc/cpuinfo) vCPUs, $(grep MemTotal /proc/meminfo | tr -s ' '), kernel $(uname -r)"
echo "--- guest: command line: $(cat /proc/cmdline)"
echo "--- guest: uptime $(cut -d' ' -f1 /proc/uptime) s; rebooting, which ends Tapir with status 0"
