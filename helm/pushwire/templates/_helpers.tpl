{{/*
Names, labels, the flags → environment mapping, and the checks that refuse impossible values.
*/}}

{{- define "pushwire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Release prefix of every resource name; 40 characters leave room for the suffixes. */}}
{{- define "pushwire.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pushwire.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "pushwire.fullname" .) }}
{{- end }}

{{- define "pushwire.worker.fullname" -}}
{{- printf "%s-worker" (include "pushwire.fullname" .) }}
{{- end }}

{{- define "pushwire.etcd.fullname" -}}
{{- printf "%s-etcd" (include "pushwire.fullname" .) }}
{{- end }}

{{- define "pushwire.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "pushwire.fullname" .) }}
{{- end }}

{{- define "pushwire.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource; call with (dict "root" $ "component" "worker"). */}}
{{- define "pushwire.labels" -}}
helm.sh/chart: {{ include "pushwire.chart" .root }}
{{ include "pushwire.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pushwire
{{- end }}

{{- define "pushwire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pushwire.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pushwire.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pushwire.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pushwire.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The port of a listen address such as 0.0.0.0:50051 or [::]:50051. */}}
{{- define "pushwire.port" -}}
{{- regexFind "[0-9]+$" . }}
{{- end }}

{{/*
Whole seconds, rounded up, of a duration written as a sequence of <number><unit> with units
d, h, m, s and ms (the subset of humantime's syntax that values.schema.json allows).
*/}}
{{- define "pushwire.seconds" -}}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+[a-z]+" . -1 }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- else if eq $unit "d" }}{{ $ms = add $ms (mul $n 86400000) }}
{{- else }}{{ fail (printf "duration %q: unit %q is not one of d, h, m, s, ms" $ $unit) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
Where the control plane keeps its configuration: "external" (controlPlane.flags.etcdEndpoints),
"bundled" (etcd.bundled) or "embedded" (the redb file in dataDir).
*/}}
{{- define "pushwire.store" -}}
{{- if .Values.controlPlane.flags.etcdEndpoints }}external
{{- else if .Values.etcd.bundled.enabled }}bundled
{{- else }}embedded
{{- end }}
{{- end }}

{{- define "pushwire.extraCa.enabled" -}}
{{- if or .Values.extraCa.existingSecret .Values.extraCa.existingConfigMap }}true{{ end }}
{{- end }}

{{/* "true" when controlPlane.extraEnv sets PUSHWIRE_ENCRYPTION_KEY (one key, no file). */}}
{{- define "pushwire.encryption.fromEnv" -}}
{{- range .Values.controlPlane.extraEnv }}
{{- if eq (toString .name) "PUSHWIRE_ENCRYPTION_KEY" }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Name of the Secret this chart creates with a random encryption key: only with etcd (the
embedded store generates its own key on its volume), with encryption.generate, and when no key
is given otherwise (encryption.existingSecret, controlPlane.flags.encryptionKeyFile,
PUSHWIRE_ENCRYPTION_KEY in controlPlane.extraEnv). Empty when none.
*/}}
{{- define "pushwire.encryption.generatedSecret" -}}
{{- $enc := .Values.encryption }}
{{- if and $enc.generate (not $enc.existingSecret) (not .Values.controlPlane.flags.encryptionKeyFile) (not (include "pushwire.encryption.fromEnv" .)) (ne (include "pushwire.store" .) "embedded") }}
{{- printf "%s-encryption" (include "pushwire.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Secret mounted at /etc/pushwire/encryption: encryption.existingSecret or the generated one. */}}
{{- define "pushwire.encryption.secret" -}}
{{- default (include "pushwire.encryption.generatedSecret" .) .Values.encryption.existingSecret }}
{{- end }}

{{/* "true" when a tokenFile flag is set (sharedFlags, controlPlane.flags or worker.flags): the
user mounts their own token file, and the chart's token Secret is off. */}}
{{- define "pushwire.tokens.own" -}}
{{- if or .Values.sharedFlags.tokenFile .Values.controlPlane.flags.tokenFile .Values.worker.flags.tokenFile }}true{{ end }}
{{- end }}

{{/*
Name of the Secret this chart creates with random tokens and their token file: with
tokens.generate, no tokens.existingSecret and no tokenFile flag. Empty when none.
*/}}
{{- define "pushwire.tokens.generatedSecret" -}}
{{- if and .Values.tokens.generate (not .Values.tokens.existingSecret) (not (include "pushwire.tokens.own" .)) }}
{{- printf "%s-tokens" (include "pushwire.fullname" .) }}
{{- end }}
{{- end }}

{{/* The token Secret mounted at /etc/pushwire/tokens: tokens.existingSecret or the generated one. */}}
{{- define "pushwire.tokens.secret" -}}
{{- if not (include "pushwire.tokens.own" .) }}
{{- default (include "pushwire.tokens.generatedSecret" .) .Values.tokens.existingSecret }}
{{- end }}
{{- end }}

{{/*
The Secret holding the delivery store's URL: deliveryStore.existingSecret, or the bundled
PostgreSQL's Secret (key url). Empty when neither: only a control plane running the worker on
the embedded store may go without (its SQLite file in dataDir; pushwire.validate refuses the
rest).
*/}}
{{- define "pushwire.deliveryStore.secret" -}}
{{- if .Values.deliveryStore.existingSecret }}
{{- .Values.deliveryStore.existingSecret }}
{{- else if .Values.postgresql.bundled.enabled }}
{{- include "pushwire.postgresql.fullname" . }}
{{- end }}
{{- end }}

{{/* The key of the URL in that Secret. */}}
{{- define "pushwire.deliveryStore.key" -}}
{{- if .Values.deliveryStore.existingSecret }}{{ .Values.deliveryStore.key }}{{ else }}url{{ end }}
{{- end }}

{{/*
PUSHWIRE_DELIVERY_STORE (--delivery-store) of a container, from the Secret through secretKeyRef:
the URL holds a password, so it is never a plain value.
*/}}
{{- define "pushwire.deliveryStore.env" -}}
{{- with include "pushwire.deliveryStore.secret" . }}
- name: PUSHWIRE_DELIVERY_STORE
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "pushwire.deliveryStore.key" $ }}
{{- end }}
{{- end }}

{{/* "true" when controlPlane.extraEnv or worker.extraEnv sets PUSHWIRE_DELIVERY_STORE. */}}
{{- define "pushwire.deliveryStore.fromEnv" -}}
{{- range concat .Values.controlPlane.extraEnv .Values.worker.extraEnv }}
{{- if eq (toString .name) "PUSHWIRE_DELIVERY_STORE" }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when worker.extraEnv sets PUSHWIRE_CONTROL_PLANE_TOKEN (the worker token, no file). */}}
{{- define "pushwire.tokens.workerFromEnv" -}}
{{- range .Values.worker.extraEnv }}
{{- if eq (toString .name) "PUSHWIRE_CONTROL_PLANE_TOKEN" }}true{{ end }}
{{- end }}
{{- end }}

{{/*
The flags of one component, as a dict keyed by camelCase flag name: sharedFlags, overridden by
the component's own flags when set there (not null), then the values the chart derives.
Call with (dict "root" $ "component" "controlPlane"|"worker"); returns YAML (fromYaml it).
*/}}
{{- define "pushwire.flags" -}}
{{- $root := .root }}
{{- $own := index $root.Values .component "flags" }}
{{- $flags := dict }}
{{- range $key, $value := $root.Values.sharedFlags }}
{{- $_ := set $flags $key $value }}
{{- end }}
{{- range $key, $value := $own }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $flags $key $value }}
{{- end }}
{{- end }}
{{- if and (include "pushwire.extraCa.enabled" $root) (not $flags.extraCaFile) }}
{{- $_ := set $flags "extraCaFile" (printf "/etc/pushwire/extra-ca/%s" $root.Values.extraCa.key) }}
{{- end }}
{{- if and (include "pushwire.tokens.secret" $root) (not $flags.tokenFile) }}
{{- $_ := set $flags "tokenFile" "/etc/pushwire/tokens/tokens.json" }}
{{- end }}
{{- if eq .component "controlPlane" }}
{{- if and (include "pushwire.encryption.secret" $root) (not $flags.encryptionKeyFile) }}
{{- $_ := set $flags "encryptionKeyFile" (printf "/etc/pushwire/encryption/%s" $root.Values.encryption.key) }}
{{- end }}
{{- if eq (include "pushwire.store" $root) "bundled" }}
{{- /* Every member by its stable name, not the Service: the control plane keeps one connection
       per member, sends calls to the leader and fails over between members itself. */ -}}
{{- $etcd := include "pushwire.etcd.fullname" $root }}
{{- $members := list }}
{{- range $i := until (int $root.Values.etcd.bundled.replicas) }}
{{- $members = append $members (printf "http://%s-%d.%s-headless.%s.svc:2379" $etcd $i $etcd $root.Release.Namespace) }}
{{- end }}
{{- $_ := set $flags "etcdEndpoints" $members }}
{{- end }}
{{- else }}
{{- if and (include "pushwire.tokens.secret" $root) (not $flags.controlPlaneTokenFile) (not (include "pushwire.tokens.workerFromEnv" $root)) }}
{{- $_ := set $flags "controlPlaneTokenFile" "/etc/pushwire/tokens/worker-token" }}
{{- end }}
{{- if not $flags.controlPlane }}
{{- $cp := fromYaml (include "pushwire.flags" (dict "root" $root "component" "controlPlane")) }}
{{- $_ := set $flags "controlPlane" (printf "dns:///%s-headless:%s" (include "pushwire.controlPlane.fullname" $root) (include "pushwire.port" $cp.grpcAddr)) }}
{{- end }}
{{- end }}
{{- toYaml $flags }}
{{- end }}

{{/*
The flags as environment variables: flag fooBar is PUSHWIRE_FOO_BAR. Null: not passed (the
binary's default); lists: comma-separated, not passed when empty; numbers as integers.
Call with the dict of "pushwire.flags".
*/}}
{{- define "pushwire.flagsEnv" -}}
{{- range $key := keys . | sortAlpha }}
{{- $value := get $ $key }}
{{- $name := printf "PUSHWIRE_%s" (snakecase $key | upper) }}
{{- if kindIs "invalid" $value }}
{{- else if kindIs "slice" $value }}
{{- if $value }}
- name: {{ $name }}
  value: {{ join "," $value | quote }}
{{- end }}
{{- else if or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) }}
- name: {{ $name }}
  value: {{ int64 $value | toString | quote }}
{{- else }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* OTEL_* variables; call with (dict "root" $ "service" "pushwire-worker"). */}}
{{- define "pushwire.otelEnv" -}}
{{- $otel := .root.Values.otel }}
{{- if $otel.enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- with $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otel.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.sampler | quote }}
{{- with $otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with $otel.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: OTEL_EXPORTER_OTLP_HEADERS
{{- end }}
- name: OTEL_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- $attrs := list (printf "k8s.namespace.name=%s" .root.Release.Namespace) "k8s.pod.name=$(OTEL_POD_NAME)" }}
{{- range $key := keys $otel.resourceAttributes | sortAlpha }}
{{- $attrs = append $attrs (printf "%s=%s" $key (toString (get $otel.resourceAttributes $key))) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of the extra CA bundle. */}}
{{- define "pushwire.extraCa.volume" -}}
{{- if .Values.extraCa.existingSecret }}
- name: extra-ca
  secret:
    secretName: {{ .Values.extraCa.existingSecret }}
    items:
      - key: {{ .Values.extraCa.key }}
        path: {{ .Values.extraCa.key }}
{{- else if .Values.extraCa.existingConfigMap }}
- name: extra-ca
  configMap:
    name: {{ .Values.extraCa.existingConfigMap }}
    items:
      - key: {{ .Values.extraCa.key }}
        path: {{ .Values.extraCa.key }}
{{- end }}
{{- end }}

{{- define "pushwire.extraCa.mount" -}}
{{- if include "pushwire.extraCa.enabled" . }}
- name: extra-ca
  mountPath: /etc/pushwire/extra-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volume and mount of the control plane's encryption key file, read-only. With the pod's fsGroup
the file is readable by the owner (root) and that group only (0440); without, Kubernetes'
default (0644).
*/}}
{{- define "pushwire.encryption.volume" -}}
{{- with include "pushwire.encryption.secret" . }}
- name: encryption-key
  secret:
    secretName: {{ . }}
    {{- if $.Values.podSecurityContext.fsGroup }}
    defaultMode: 288 # 0440
    {{- end }}
    items:
      - key: {{ $.Values.encryption.key }}
        path: {{ $.Values.encryption.key }}
{{- end }}
{{- end }}

{{- define "pushwire.encryption.mount" -}}
{{- if include "pushwire.encryption.secret" . }}
- name: encryption-key
  mountPath: /etc/pushwire/encryption
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volume and mount of the token Secret, read-only (0440 with the pod's fsGroup, as the key):
the token file for every component, and the worker token for the workers only (call with
(dict "root" $ "worker" true)). A directory mount, so that changes of the Secret reach the
running processes (the token file is re-read on change).
*/}}
{{- define "pushwire.tokens.volume" -}}
{{- $root := .root }}
{{- with include "pushwire.tokens.secret" $root }}
- name: tokens
  secret:
    secretName: {{ . }}
    {{- if $root.Values.podSecurityContext.fsGroup }}
    defaultMode: 288 # 0440
    {{- end }}
    items:
      - key: tokens.json
        path: tokens.json
      {{- if $.worker }}
      - key: worker-token
        path: worker-token
      {{- end }}
{{- end }}
{{- end }}

{{- define "pushwire.tokens.mount" -}}
{{- if include "pushwire.tokens.secret" . }}
- name: tokens
  mountPath: /etc/pushwire/tokens
  readOnly: true
{{- end }}
{{- end }}

{{/* A preferred anti-affinity over nodes for one component, unless affinity is given. */}}
{{- define "pushwire.affinity" -}}
{{- $values := index .root.Values .component }}
{{- if $values.affinity }}
{{- toYaml $values.affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "pushwire.selectorLabels" (dict "root" .root "component" .label) | nindent 12 }}
{{- end }}
{{- end }}

{{/* Topology spread constraints, with the component's pods as the default labelSelector. */}}
{{- define "pushwire.topologySpread" -}}
{{- $values := index .root.Values .component }}
{{- range $values.topologySpreadConstraints }}
{{- $c := deepCopy . }}
{{- if not $c.labelSelector }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (fromYaml (include "pushwire.selectorLabels" (dict "root" $.root "component" $.label)))) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/* Refuses values no deployment could run with; included by every component template. */}}
{{- define "pushwire.validate" -}}
{{- $store := include "pushwire.store" . }}
{{- if and .Values.controlPlane.flags.etcdEndpoints .Values.etcd.bundled.enabled }}
{{- fail "controlPlane.flags.etcdEndpoints names an etcd while etcd.bundled.enabled is true: choose one (set etcd.bundled.enabled=false to use your etcd)" }}
{{- end }}
{{- if and (eq $store "embedded") (ne (int .Values.controlPlane.replicas) 1) }}
{{- fail (printf "controlPlane.replicas is %d but the control plane uses the embedded store (no controlPlane.flags.etcdEndpoints, etcd.bundled.enabled=false), which allows exactly 1 replica: set controlPlane.replicas=1 or give it etcd" (int .Values.controlPlane.replicas)) }}
{{- end }}
{{- if and (not .Values.worker.enabled) (not .Values.controlPlane.flags.withWorker) }}
{{- fail "worker.enabled=false and controlPlane.flags.withWorker is not true: nothing would deliver webhooks; enable one of them" }}
{{- end }}
{{- $enc := .Values.encryption }}
{{- $keyFile := .Values.controlPlane.flags.encryptionKeyFile }}
{{- $keyEnv := include "pushwire.encryption.fromEnv" . }}
{{- if and $keyEnv (or $enc.existingSecret $keyFile) }}
{{- fail "controlPlane.extraEnv sets PUSHWIRE_ENCRYPTION_KEY and encryption.existingSecret or controlPlane.flags.encryptionKeyFile gives a key file: the control plane refuses two key sources; choose one" }}
{{- end }}
{{- if and (ne $store "embedded") (not (or $enc.existingSecret $enc.generate $keyFile $keyEnv)) }}
{{- fail (printf "the control plane uses etcd (%s) but has no encryption key for secrets at rest, and refuses to start without one: set encryption.existingSecret to a Secret whose key %q holds the key file (lines key-id:base64-of-32-bytes; docs/operations.md \"Secrets at rest\"), or encryption.generate=true, or controlPlane.flags.encryptionKeyFile to a file you mount" (ternary "controlPlane.flags.etcdEndpoints" "etcd.bundled" (eq $store "external")) $enc.key) }}
{{- end }}
{{- if and .Values.tokens.existingSecret (include "pushwire.tokens.own" .) }}
{{- fail "tokens.existingSecret and a tokenFile flag (sharedFlags, controlPlane.flags or worker.flags) both give the token file: choose one" }}
{{- end }}
{{- if and .Values.postgresql.bundled.enabled .Values.deliveryStore.existingSecret }}
{{- fail (printf "deliveryStore.existingSecret (%s) names a delivery store while postgresql.bundled.enabled is true: choose one (set postgresql.bundled.enabled=false to use your PostgreSQL)" .Values.deliveryStore.existingSecret) }}
{{- end }}
{{- if include "pushwire.deliveryStore.fromEnv" . }}
{{- fail "PUSHWIRE_DELIVERY_STORE is set in controlPlane.extraEnv or worker.extraEnv: the URL holds a password, give it with deliveryStore.existingSecret (a Secret) instead" }}
{{- end }}
{{- if not (include "pushwire.deliveryStore.secret" .) }}
{{- $sqliteOk := and (not .Values.worker.enabled) .Values.controlPlane.flags.withWorker (eq $store "embedded") }}
{{- if not $sqliteOk }}
{{- fail (printf "no delivery store: %s refuse to start without one. Set deliveryStore.existingSecret to a Secret whose key %q holds the URL (postgres://USER:PASSWORD@HOST:5432/DATABASE; docs/kubernetes.md \"Delivery store\"), or postgresql.bundled.enabled=true for evaluation. Only one control plane on the embedded store running the worker itself (controlPlane.flags.withWorker=true, worker.enabled=false, as ci/minimal-values.yaml) may go without: it keeps an SQLite file in its dataDir" (ternary "the workers" "control planes running the worker on etcd" .Values.worker.enabled) .Values.deliveryStore.key) }}
{{- end }}
{{- end }}
{{- if and .Values.otel.enabled (not .Values.otel.endpoint) }}
{{- fail "otel.enabled=true needs otel.endpoint" }}
{{- end }}
{{- end }}
